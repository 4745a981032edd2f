"""Cost of calibration against the float forward over the same tokens (ratio measured in one run).

Both run the captured float program over the same calibration windows; calibration adds the
observers and the range search. The issue's target is at most 1.15x.

    python tools/bench_calibrate.py [--model default] [--windows 32] [--window 512] [--observer mse]
"""

import argparse
import time

import torch

from qpass.core import corpus
from qpass.core.calibrate import calibrate
from qpass.core.config import QuantConfig
from qpass.core.data import token_windows
from qpass.frontends.torch_export.frontend import TorchExportFrontend


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--observer", default="mse")
    args = parser.parse_args()
    frontend = TorchExportFrontend.load(args.model, args.window)
    config = QuantConfig(fa_quant=True, kv_cache="static", observer=args.observer, window=args.window,
                         calib_samples=args.windows)
    ids = token_windows(frontend.tokenizer, corpus.calibration_samples(), args.window, args.windows, "calib")
    sites = frontend.attention_sites()
    module = frontend.logits()
    with torch.no_grad():
        module(ids[: config.batch_size])  # warm-up, not timed
        start = time.perf_counter()
        for batch in ids.split(config.batch_size):
            module(batch)
        float_s = time.perf_counter() - start
    start = time.perf_counter()
    calibrate(frontend, ids, config)
    calib_s = time.perf_counter() - start
    print(f"{frontend.name}: {ids.numel()} tokens, {len(sites)} sites, observer {args.observer}")
    print(f"float forward {float_s:.2f}s, calibration {calib_s:.2f}s, ratio {calib_s / float_s:.3f}x (target <= 1.15x)")


if __name__ == "__main__":
    main()
