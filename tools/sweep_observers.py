"""Perplexity increase of C8 and FAQuant on SmolLM2 for each observer, on prose and on code.

Calibrates once (observers keep their statistics), then evaluates every (observer, mode, text)
combination against the float program on the same windows. Prints one row per combination.

    python tools/sweep_observers.py [--calib-samples 64] [--eval-windows 32] [--observers minmax,mse] [--symmetric]
"""

import argparse
import dataclasses
import time

import torch

from qpass.core import corpus
from qpass.core.calibrate import SAMPLE_TOKENS, attention_qparams
from qpass.core.config import QuantConfig
from qpass.core.data import token_windows
from qpass.core.evaluate import perplexity
from qpass.core.observers import Observer
from qpass.core.recipe import Recipe, geometry
from qpass.frontends.torch_export.frontend import TorchExportFrontend


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--observers", default="minmax,percentile,mse")
    parser.add_argument("--symmetric", action="store_true", help="symmetric int8 (offset 0), as vllm-ascend and ONNX Runtime's GQA need")
    args = parser.parse_args()
    torch.manual_seed(0)
    fe = TorchExportFrontend.load(args.model, args.window)
    base = QuantConfig(fa_quant=True, kv_cache="int8", window=args.window, calib_samples=args.calib_samples,
                       symmetric=args.symmetric)
    sites = fe.attention_sites()
    calib = token_windows(fe.tokenizer, corpus.calibration_samples(), args.window, args.calib_samples, "calib")
    stride = max(1, calib.numel() // 4096)
    observers = {getattr(s, kind): Observer(stride, SAMPLE_TOKENS) for s in sites for kind in ("q", "k", "v")}
    start = time.perf_counter()
    fe.observe(calib, observers, base.batch_size)
    print(f"calibration forward: {time.perf_counter() - start:.1f}s over {calib.numel()} tokens")
    texts = {"prose": corpus.eval_prose(), "code": corpus.eval_code()}
    float_module = fe.logits()
    for text_name, text in texts.items():
        ids = token_windows(fe.tokenizer, [text], args.window, args.eval_windows, "eval")
        ppl_float = perplexity(float_module, ids, base.batch_size, "float")
        print(f"{text_name}: {ids.numel()} tokens, float ppl {ppl_float:.4f}")
        for method in args.observers.split(","):
            for mode, cfg in (("C8", dict(fa_quant=False)), ("FAQuant", dict(kv_cache=None)), ("both", {})):
                config = dataclasses.replace(base, observer=method, **cfg)
                recipe = Recipe(config, geometry(sites), *attention_qparams(sites, observers, config))
                ppl = perplexity(fe.logits(recipe), ids, base.batch_size, mode)
                print(f"  {text_name:5} {method:10} {mode:8} ppl {ppl:.4f}  {100 * (ppl / ppl_float - 1):+.3f}%", flush=True)


if __name__ == "__main__":
    main()
