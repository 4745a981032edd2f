"""Cost of calibration against the float forward over the same tokens (ratio measured in one run).

Both run the captured float program over the same calibration windows; calibration adds the
observers and the range search. The issue's target is at most 1.15x.

    python tools/bench_calibrate.py [--model default] [--windows 32] [--window 512] [--observer mse]
"""

import argparse
import time

import torch

from qpass import corpus
from qpass.api import param_names
from qpass.calibrate import calibrate
from qpass.capture import capture
from qpass.config import QuantConfig
from qpass.data import token_windows
from qpass.models.loaders import load_model
from qpass.passes.find_attention_sites import find_attention_sites


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--observer", default="mse")
    args = parser.parse_args()
    loaded = load_model(args.model)
    config = QuantConfig(fa_quant=True, kv_cache="int8", observer=args.observer, window=args.window,
                         calib_samples=args.windows)
    ids = token_windows(loaded.tokenizer, corpus.calibration_samples(), args.window, args.windows, "calib")
    program = capture(loaded.model, args.window)
    sites = find_attention_sites(program.graph, param_names(program))
    module = program.module()
    with torch.no_grad():
        module(ids[: config.batch_size])  # warm-up, not timed
        start = time.perf_counter()
        for batch in ids.split(config.batch_size):
            module(batch)
        float_s = time.perf_counter() - start
    start = time.perf_counter()
    calibrate(program, sites, ids, config)
    calib_s = time.perf_counter() - start
    print(f"{loaded.name}: {ids.numel()} tokens, {len(sites)} sites, observer {args.observer}")
    print(f"float forward {float_s:.2f}s, calibration {calib_s:.2f}s, ratio {calib_s / float_s:.3f}x (target <= 1.15x)")


if __name__ == "__main__":
    main()
