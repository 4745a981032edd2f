"""Perplexity increase of C8 and FAQuant on SmolLM2 for each observer, on prose and on code.

Calibrates once (observers keep their statistics), then evaluates every (observer, mode, text)
combination against the float program on the same windows. Prints one row per combination.

    python tools/sweep_observers.py [--calib-samples 64] [--eval-windows 32]
"""

import argparse
import dataclasses
import time

import torch

from qpass import corpus
from qpass.api import param_names
from qpass.calibrate import attach_observers, make_recipe
from qpass.capture import capture
from qpass.config import QuantConfig
from qpass.data import token_windows
from qpass.evaluate import perplexity
from qpass.models.loaders import load_model
from qpass.passes.find_attention_sites import find_attention_sites
from qpass.pipeline import quantize_program


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--observers", default="minmax,percentile,mse")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model(args.model)
    base = QuantConfig(fa_quant=True, kv_cache="int8", window=args.window, calib_samples=args.calib_samples)
    program = capture(loaded.model, args.window)
    sites = find_attention_sites(program.graph, param_names(program))
    calib = token_windows(loaded.tokenizer, corpus.calibration_samples(), args.window, args.calib_samples, "calib")
    gm = program.module()
    observers = attach_observers(gm, sites, ("q", "k", "v"), max(1, calib.numel() // 4096))
    start = time.perf_counter()
    with torch.no_grad():
        for batch in calib.split(base.batch_size):
            gm(batch)
    print(f"calibration forward: {time.perf_counter() - start:.1f}s over {calib.numel()} tokens")
    texts = {"prose": corpus.eval_prose(), "code": corpus.eval_code()}
    float_module = program.module()
    for text_name, text in texts.items():
        ids = token_windows(loaded.tokenizer, [text], args.window, args.eval_windows, "eval")
        ppl_float = perplexity(float_module, ids, base.batch_size, "float")
        print(f"{text_name}: {ids.numel()} tokens, float ppl {ppl_float:.4f}")
        for method in args.observers.split(","):
            for mode, cfg in (("C8", dict(fa_quant=False)), ("FAQuant", dict(kv_cache=None)), ("both", {})):
                config = dataclasses.replace(base, observer=method, **cfg)
                recipe = make_recipe(sites, observers, config)
                quantized, _ = quantize_program(program, sites, recipe)
                ppl = perplexity(quantized.module(), ids, base.batch_size, mode)
                print(f"  {text_name:5} {method:10} {mode:8} ppl {ppl:.4f}  {100 * (ppl / ppl_float - 1):+.3f}%", flush=True)


if __name__ == "__main__":
    main()
