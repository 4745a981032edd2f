"""W8A8 + FAQuant + C8 `--disable-level auto` from a small calibration file (issue 9, item 4): a table.

Per variant (anti-method and act-method), calibrates on ``--windows`` windows of the standard-library
corpus (spread over it, as ``--calib-samples`` does), lets the `auto` search choose the float Linears
for ``--max-ppl-increase``, then measures the perplexity increase on unseen prose and unseen code
(:func:`qpass.core.corpus.eval_prose` / ``eval_code``, 32 windows each) against the float model.

    python tools/bench_w8a8_small.py [--windows 14] [--variants m3:3,m1:1] [--all-int8] [--json out.json] [--float-cache f.pt]

A variant is ``ANTI:ACT`` (``none`` for no smoothing), e.g. ``m3:3`` = ``--anti-method m3 --act-method 3``.
With ``--all-int8`` each variant is also measured with every Linear int8 (``--disable-level L0``).
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

from qpass.core import corpus
from qpass.core.calibrate import calibrate
from qpass.core.config import EVAL_WINDOWS, QuantConfig
from qpass.core.data import token_windows
from qpass.core.evaluate import window_nll
from qpass.frontends.torch_export.frontend import TorchExportFrontend

PARTS = 4  # chunks per 512-token window for the design effect (fallback.CHUNK_TOKENS = 128)


def measure(frontend, recipe, ids, nll_float, batch_size) -> tuple[float, float]:
    """``(perplexity increase %, design effect)`` over ``ids [N, W]``; ``nll_float [N, PARTS]`` per chunk.

    The design effect is the variance of the per-window NLL differences over what it would be if a window's
    PARTS chunk differences were independent (var of chunks / PARTS): near 1, chunks are as good as
    independent samples for the `auto` bound; well above 1, chunks of one window move together."""
    diff = window_nll(frontend.logits(recipe, verify=False), ids, batch_size, "bench quantized", PARTS).view(-1, PARTS) - nll_float
    per_window = (diff * chunk_weights(ids)).sum(1)
    deff = float(per_window.var() * PARTS / diff.flatten().var())
    return (math.exp(float(per_window.mean())) - 1.0) * 100.0, deff


def chunk_weights(ids):  # chunk sizes of the W - 1 predicted tokens, as window_nll splits them
    sizes = torch.tensor([len(c) for c in torch.arange(ids.shape[1] - 1).tensor_split(PARTS)], dtype=torch.float64)
    return sizes / sizes.sum()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--windows", type=int, default=14, help="calibration windows (default 14)")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--max-ppl-increase", type=float, default=2.0)
    parser.add_argument("--variants", default="m3:3", help="comma-separated ANTI:ACT (default m3:3)")
    parser.add_argument("--all-int8", action="store_true", help="also measure each variant with every Linear int8")
    parser.add_argument("--json", help="write the rows here too")
    parser.add_argument("--float-cache", help="keep the float model's chunk NLLs of the eval texts in this file")
    args = parser.parse_args()
    frontend = TorchExportFrontend.load(args.model, args.window)
    tok = frontend.tokenizer
    calib = token_windows(tok, corpus.calibration_samples(), args.window, args.windows, "calib")
    evals = {"prose": token_windows(tok, [corpus.eval_prose()], args.window, EVAL_WINDOWS, "prose"),
             "code": token_windows(tok, [corpus.eval_code()], args.window, EVAL_WINDOWS, "code")}
    floats = torch.load(args.float_cache) if args.float_cache and Path(args.float_cache).exists() else None
    if floats is None:
        floats = {k: window_nll(frontend.logits(), ids, 4, f"float {k}", PARTS).view(-1, PARTS) for k, ids in evals.items()}
        if args.float_cache:
            torch.save(floats, args.float_cache)
    print(f"{frontend.name}: calibration {calib.shape[0]} x {args.window}; float ppl "
          + ", ".join(f"{k} {math.exp(float((v * chunk_weights(evals[k])).sum(1).mean())):.4f}" for k, v in floats.items()), flush=True)
    rows = []
    for variant in args.variants.split(","):
        anti, act = variant.split(":")
        levels = ["auto", "L0"] if args.all_int8 else ["auto"]
        for level in levels:
            config = QuantConfig(w8a8=True, fa_quant=True, kv_cache="int8", disable_level=level, window=args.window,
                                 anti_method=None if anti == "none" else anti, act_method=int(act),
                                 calib_samples=args.windows, max_ppl_increase=args.max_ppl_increase)
            start = time.perf_counter()
            recipe = calibrate(frontend, calib, config)
            calib_s = time.perf_counter() - start
            search = recipe.stats["w8a8"].get("search", [])
            n_float, n_all = len(recipe.w8a8["float_linears"]), len(recipe.stats["w8a8"]["range_ratio"])
            row = {"variant": variant, "level": level, "float": n_float, "linears": n_all, "calib_s": round(calib_s, 1),
                   "held_all_int8": search[1]["ppl_increase_pct"] if len(search) > 1 else None,
                   "held_choice": next((s for s in reversed(search[1:]) if s["float_linears"] == n_float), None),
                   **{k: measure(frontend, recipe, ids, floats[k], config.batch_size) for k, ids in evals.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| variant | level | float Linears | held-out all-int8 | held-out at choice (est / bound) | prose | code "
          "| design effect prose / code |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["held_choice"]
        at = f"{c['ppl_increase_pct']:+.2f}% / {c['upper_95_pct']:+.2f}%" if c else ""
        held = f"{r['held_all_int8']:+.2f}%" if r["held_all_int8"] is not None else ""
        print(f"| {r['variant']} | {r['level']} | {r['float']} ({100 * r['float'] / r['linears']:.1f}%) | {held} | {at} "
              f"| {r['prose'][0]:+.2f}% | {r['code'][0]:+.2f}% | {r['prose'][1]:.2f} / {r['code'][1]:.2f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
