"""Perplexity increase of C8, FAQuant and the dynamic cache on SmolLM2, per range method and domain pair.

The dynamic cache is measured with its key smoothing searched on the pair's calibration windows, as a compile does
(``dynamic``), and without it (``dynamic-unsmoothed``), the two paired on the same windows.

Each domain pair (``qpass.core.corpus.domain_pairs``: the standard split, docstrings only -> source,
source -> docstrings, one package -> another) is calibrated once (observers keep their statistics and
each window's extremes), then every (range method, mode) is evaluated against the float program on the
same windows of the pair's evaluation text. Prints one row per combination, with the 95% interval of the
increase over the evaluation windows (1.96 standard errors of the per-window NLL differences: how much the
figure would move on other windows of the same text), and a markdown table. ``--between`` takes the windows
halfway between the default ones (one fewer), a second sample of the same text.

    python -m tools.sweep_observers [--pairs all] [--observers minmax,mse,extreme] [--modes C8,FAQuant]
                                    [--symmetric]  (or the modes C8-symmetric, FAQuant-symmetric)
                                    [--calib-samples 64] [--eval-windows 32] [--between]
"""

import dataclasses
import gc
import math
import time

import qpass
from qpass.core import corpus
from qpass.core.config import RunSettings
from tools import common

BATCH_SIZE = RunSettings.batch_size

MODES = {
    "C8": dict(fa_quant=False, kv_cache="static"),
    "FAQuant": dict(fa_quant=True, kv_cache=None),
    "dynamic": dict(fa_quant=False, kv_cache="dynamic"),  # with its key smoothing, as a compile makes it
    "dynamic-unsmoothed": dict(fa_quant=False, kv_cache="dynamic"),
    "C8-symmetric": dict(fa_quant=False, kv_cache="static", symmetric=True),
    "FAQuant-symmetric": dict(fa_quant=True, kv_cache=None, symmetric=True),
}


def observe_pair(fe, samples: list[str], window: int, windows: int, keys: bool) -> tuple[dict, tuple | None]:
    """Observers (``qpass.core.observers.Observer`` by value name) of every site's q, k and v over ``windows``
    calibration windows of ``window`` tokens from the pair's ``samples``, and (``keys``) those the dynamic cache's
    key smoothing is searched with, as a compile makes them (a second run over the same windows), with the sites it
    applies to (:func:`qpass.core.calibrate.key_smoothing_sites`)."""
    from qpass.core.calibrate import SAMPLE_TOKENS, attention_observers, key_smoothing_sites
    from qpass.core.data import token_windows
    from qpass.core.observers import Observer

    calib = token_windows(fe.tokenizer, samples, window, windows, "calib")
    stride = max(1, calib.numel() // SAMPLE_TOKENS)
    observers = {
        getattr(s, kind): Observer(stride, SAMPLE_TOKENS, window)
        for s in fe.attention_sites()
        for kind in ("q", "k", "v")
    }
    start = time.perf_counter()
    fe.observe(calib, observers, BATCH_SIZE)
    key_smoothing = None
    if keys:
        sites, config = fe.attention_sites(), qpass.QuantConfig(kv_cache="dynamic")
        sites_keys = key_smoothing_sites(fe, sites, config)
        key_observers = attention_observers(sites, config, calib, None, sites_keys)
        fe.observe(calib, key_observers, BATCH_SIZE)
        key_smoothing = key_observers, sites_keys
    print(
        f"  calibration: {calib.shape[0]} windows, {calib.numel()} tokens, {time.perf_counter() - start:.1f}s",
        flush=True,
    )
    return observers, key_smoothing


def increase(fe, observers, config, ids, nll_float, key_smoothing=None) -> tuple[float, float, object]:
    """Perplexity increase (percent) of ``config``'s recipe from ``observers`` (the dynamic cache's key smoothing:
    from ``key_smoothing``, the observers and sites :func:`observe_pair` gives) on ``ids [N, W]``, the half width of
    its 95% interval over the windows (``nll_float [N]``: the float program's per-window NLL), and the per-window NLL
    increase ``[N]``."""
    from qpass.core.calibrate import attention_qparams
    from qpass.core.evaluate import window_nll
    from qpass.core.recipe import geometry

    sites = fe.attention_sites()
    if key_smoothing is not None:
        tensors, stats = attention_qparams(sites, key_smoothing[0], config, keys=key_smoothing[1])
    else:
        tensors, stats = attention_qparams(sites, observers, config) if config.observed_kinds else ({}, {})
    nll = window_nll(fe.logits(qpass.Recipe(config, geometry(sites), tensors, stats)), ids, BATCH_SIZE, "quantized")
    gc.collect()  # the quantized program's module graph holds reference cycles: free its weights before the next
    diff = nll - nll_float
    return common.pct_increase(diff), common.half_width(diff), diff


def parse_args():
    parser = common.parser(__doc__, __spec__.name)
    common.add_model_options(parser)
    parser.add_argument("--pairs", default="all", help="comma-separated pair names, or all")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--observers", default="minmax,mse,extreme")
    parser.add_argument("--modes", default="C8,FAQuant", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument(
        "--symmetric", action="store_true", help="symmetric int8 (offset 0), as vllm-ascend and ONNX Runtime's GQA need"
    )
    parser.add_argument(
        "--between", action="store_true", help="evaluate on the windows halfway between the default ones"
    )
    return parser.parse_args()


def sweep_pair(fe, name: str, observed, ids, nll_float, base, args, table: dict) -> None:
    """Every (mode, range method) of ``args`` on the pair ``name``: one line each (and each method paired against
    the mode's first), its increase into ``table``; the dynamic cache's with and without key smoothing paired."""
    observers, key_smoothing = observed
    dynamic = {}
    for mode in args.modes.split(","):
        first = None  # (method, per-window increase): later methods are paired against it
        for method in args.observers.split(",") if not mode.startswith("dynamic") else ["-"]:
            config = dataclasses.replace(base, **MODES[mode], **({"observer": method} if method != "-" else {}))
            keys = key_smoothing if mode == "dynamic" else None
            pct, half, diff = increase(fe, observers, config, ids, nll_float, keys)
            if mode.startswith("dynamic"):
                dynamic[mode] = diff
            table[name, mode, method] = pct
            print(f"  {name:20} {mode:8} {method:10} {pct:+.3f}% (95% over windows: +-{half:.3f})", flush=True)
            if first is None:
                first = method, diff
            else:
                paired = diff - first[1]  # the same windows: their spread cancels
                print(
                    f"  {'':20} {mode:8} paired {method} - {first[0]}: {100.0 * float(paired.mean()):+.3f} "
                    f"+-{common.half_width(paired):.3f} points",
                    flush=True,
                )
    if len(dynamic) == 2:
        paired = dynamic["dynamic"] - dynamic["dynamic-unsmoothed"]
        print(
            f"  {'':20} dynamic paired key smoothing - none: {100.0 * float(paired.mean()):+.3f} "
            f"+-{common.half_width(paired):.3f} points",
            flush=True,
        )


def main():
    args = parse_args()

    import torch

    from qpass.core.evaluate import window_nll

    torch.manual_seed(0)
    fe = qpass.open_model(args.model, args.window)
    base = qpass.QuantConfig(kv_cache="static", symmetric=args.symmetric)
    pairs = corpus.domain_pairs()
    names = list(pairs) if args.pairs == "all" else args.pairs.split(",")
    float_module, table, observed = fe.logits(), {}, {}
    for name in names:
        samples, text = pairs[name]
        print(f"{name}:", flush=True)
        key = hash(tuple(samples))  # the standard split's two pairs share their calibration
        if key not in observed:
            keys = "dynamic" in args.modes.split(",")
            observed = {key: observe_pair(fe, samples, args.window, args.calib_samples, keys)}  # one at a time
        ids = common.eval_windows(fe.tokenizer, text, args.window, args.eval_windows, args.between)
        nll_float = window_nll(float_module, ids, BATCH_SIZE, "float")
        print(f"  eval: {ids.numel()} tokens, float ppl {math.exp(float(nll_float.mean())):.4f}", flush=True)
        sweep_pair(fe, name, observed[key], ids, nll_float, base, args, table)
    columns = sorted({(mode, method) for _, mode, method in table}, key=lambda c: list(table).index((names[0], *c)))
    common.print_table(
        ["pair", *(f"{mode} {method}" for mode, method in columns)],
        [
            common.table_row([name, *(f"{table[name, mode, method]:+.3f}%" for mode, method in columns)])
            for name in names
        ],
    )


if __name__ == "__main__":
    main()
