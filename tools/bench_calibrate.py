"""Cost of calibration against the float forward over the same tokens (ratio measured in one run).

Both run the captured float program over the same calibration windows; calibration adds the
observers and the range search. The issue's target is at most 1.15x.

    python -m tools.bench_calibrate [--model default] [--windows 32] [--window 512] [--observer mse]
"""

import time

import qpass
from qpass.core.config import RunSettings
from tools import common


def main():
    parser = common.parser(__doc__, __spec__.name)
    common.add_model_options(parser)
    parser.add_argument("--windows", type=int, default=32, help="calibration windows (default: %(default)s)")
    parser.add_argument("--observer", default="mse")
    args = parser.parse_args()

    import torch

    from qpass.core.calibrate import calibrate

    frontend = qpass.open_model(args.model, args.window)
    config = qpass.QuantConfig(fa_quant=True, kv_cache="static", observer=args.observer)
    batch_size = RunSettings.batch_size  # as qpass compile runs by default
    ids = common.calib_windows(frontend.tokenizer, args.window, args.windows)
    sites = frontend.attention_sites()
    module = frontend.logits()
    with torch.no_grad():
        module(ids[:batch_size])  # warm-up, not timed
        start = time.perf_counter()
        for batch in ids.split(batch_size):
            module(batch)
        float_s = time.perf_counter() - start
    start = time.perf_counter()
    calibrate(frontend, ids, config, batch_size)
    calib_s = time.perf_counter() - start
    print(f"{frontend.name}: {ids.numel()} tokens, {len(sites)} sites, observer {args.observer}")
    print(f"float forward {float_s:.2f}s, calibration {calib_s:.2f}s, ratio {calib_s / float_s:.3f}x (target <= 1.15x)")


if __name__ == "__main__":
    main()
