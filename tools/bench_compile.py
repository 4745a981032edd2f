"""Time of the passes (site discovery + Q/DQ insertion + program rebuild) per layer, at 30 and 80 layers.

Random small-weight Llama models with SmolLM2's attention geometry (9 heads, 3 KV heads, head_dim 64);
80 layers is a 70B-shaped layer count. Capture and calibration are not timed (they are not passes).

    python -m tools.bench_compile [--layers 30 80] [--repeats 3]
"""

import time

import qpass
from tools import common

WINDOW = 32


def time_passes(num_layers: int, repeats: int) -> float:
    import torch

    from qpass.core.calibrate import calibrate

    # capture, pipeline, find_attention_sites: internals, as what is timed is the torch.export frontend's fx passes
    from qpass.frontends.torch_export.capture import param_names
    from qpass.frontends.torch_export.pipeline import quantize_program
    from qpass.models.loaders import LoadedModel
    from qpass.passes.fx.find_attention_sites import find_attention_sites

    frontend = qpass.open_model(LoadedModel(common.smollm2_shaped(num_layers), None, "bench", "bench"), WINDOW)
    program = frontend.program
    config = qpass.QuantConfig(fa_quant=True, kv_cache="static")
    recipe = calibrate(frontend, torch.randint(0, 512, (2, WINDOW)), config)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        sites = find_attention_sites(program.graph, param_names(program))
        quantize_program(program, sites, recipe)
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = common.parser(__doc__, __spec__.name)
    parser.add_argument("--layers", type=int, nargs="+", default=[30, 80])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    per_layer = {}
    for n in args.layers:
        total = time_passes(n, args.repeats)
        per_layer[n] = total / n
        print(f"{n:3d} layers: passes {total:.3f}s, {1000 * per_layer[n]:.2f} ms/layer")
    if len(per_layer) > 1:
        lo, hi = min(per_layer), max(per_layer)
        print(f"per-layer time at {hi} vs {lo} layers: {per_layer[hi] / per_layer[lo]:.2f}x (1.00x = linear)")


if __name__ == "__main__":
    main()
