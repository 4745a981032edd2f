"""W8A8 + FAQuant + C8 with ``--disable-level auto`` from a small calibration file, on SmolLM2: how many
Linears stay float and what unseen prose and code then measure, per smoothing and activation method.

Loads and captures the model once, then for each variant (``ANTI:ACT``, e.g. ``none:1`` for no smoothing
and min-max, ``m3:3``) calibrates on ``--calib-samples`` windows of the standard-library corpus (as
``qpass compile default --w8a8 --fa-quant --kv-int8 --disable-level auto --calib-samples 14`` does; `auto`
holds the last quarter out) and evaluates the compiled program against the float one on the same
windows of ``--prose`` and ``--code`` (text from modules the corpus leaves out: ``python -m tools.make_corpus``).
Prints the search log, the float and per-token Linears and each text's increase with the 95% interval over windows
(``--static-only``: the search without its per-token step).
``--samples between`` takes the windows halfway between the default ones (one fewer): a second sample of the same
text; ``--samples both`` measures both. ``--calib-sets`` calibrates on other texts than the standard mix, each of
modules or files the evaluation texts leave out (:func:`calib_texts`): the search must hold on any small calibration
file.

    python -m tools.bench_w8a8 [--variants none:1 m3:3] [--calib-samples 14] [--eval-windows 16]
                               [--prose out/corpus/eval_prose.txt] [--code out/corpus/eval_code.txt]
                               [--samples between|both] [--calib-sets mixed prose code notes email short long ...]
                               [--static-only]
"""

import math
import time

import qpass
from qpass.core import corpus
from tools import common

OTHER_PROSE_MODULES = ("json/encoder", "shlex", "sched", "selectors", "socket", "tempfile", "os", "sqlite3/__init__")
THIRD_PROSE_MODULES = ("http/client", "smtplib", "imaplib", "mailbox", "gettext", "optparse", "getopt", "ftplib")
# a named calibration set -> its samples; prose, code, notes and email are the calibration sides of corpus.domain_pairs
CALIB_SETS = {
    "mixed": corpus.calibration_samples,
    "prose": lambda: corpus.domain_pairs()["docstrings->source"][0],
    "code": lambda: corpus.domain_pairs()["source->docstrings"][0],
    "short": lambda: [d for m in corpus.CALIBRATION_MODULES for d in corpus.docstrings(m)],
    "long": lambda: [corpus._source(m) for m in ("typing", "argparse")],
    "notes": lambda: corpus.domain_pairs()["notes->source"][0],
    "email": lambda: corpus.domain_pairs()[f"{corpus.PACKAGE_PAIR[0]}->{corpus.PACKAGE_PAIR[1]}"][0],
    "http": lambda: corpus.package_sources("http"),
    "prose2": lambda: ["\n\n".join(corpus.docstrings(m)) for m in OTHER_PROSE_MODULES],
    "prose3": lambda: ["\n\n".join(corpus.docstrings(m)) for m in THIRD_PROSE_MODULES],
    "license": lambda: [(corpus._stdlib() / corpus.LICENSE).read_text()],
}


def calib_texts(name: str) -> list[str]:
    """The calibration samples of a named set (``CALIB_SETS``): ``mixed`` (the standard corpus, docstrings and sources
    of the calibration modules), ``prose`` (their docstrings alone), ``code`` (their sources alone), ``short`` (each
    docstring a sample of its own), ``long`` (two long sources), ``notes`` (IDLE's release notes: English with no
    code), ``email`` and ``http`` (a package's sources), ``prose2`` and ``prose3`` (docstrings of other modules),
    ``license`` (Python's licence: legal English, about 7 windows). None of them holds text of the evaluation
    modules."""
    return CALIB_SETS[name]()


def increase(diff) -> str:
    """``+x.xxx% +-h`` from per-window NLL differences ``[N]``: the increase and its 95% half width over the windows."""
    return f"{common.pct_increase(diff):+.3f}% +-{common.half_width(diff):.3f}"


def parse_args():
    parser = common.parser(__doc__, __spec__.name)
    common.add_model_options(parser)
    parser.add_argument(
        "--variants", nargs="+", default=["none:1", "m3:3"], help="ANTI:ACT pairs, e.g. none:1 m3:3 m4:3"
    )
    parser.add_argument("--calib-samples", type=int, default=14)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--max-ppl-increase", type=float, default=2.0)
    parser.add_argument("--static-only", action="store_true", help="the search without its per-token step")
    parser.add_argument("--prose", default="out/corpus/eval_prose.txt")
    parser.add_argument("--code", default="out/corpus/eval_code.txt")
    parser.add_argument(
        "--calib-sets", nargs="+", default=["mixed"], choices=sorted(CALIB_SETS), help="calibration texts (calib_texts)"
    )
    parser.add_argument(
        "--samples",
        choices=("", "between", "both"),
        default="",
        help="between: evaluate on the windows halfway between the default ones; both: on both samples",
    )
    return parser.parse_args()


def variant_row(fe, variant: str, calib, texts: dict, nll_float: dict, args, calib_set: str = "mixed") -> str:
    """Calibrate ``variant`` (``ANTI:ACT``) on ``calib`` (the set ``calib_set``), print its search log and float
    Linears; its markdown row."""
    from qpass.core.calibrate import calibrate
    from qpass.core.evaluate import window_nll

    anti, act = variant.split(":")
    config = qpass.QuantConfig(
        fa_quant=True,
        kv_cache="static",
        w8a8=True,
        disable_level="auto",
        max_ppl_increase=args.max_ppl_increase,
        anti_method=None if anti == "none" else anti,
        act_method=int(act),
        static_only=args.static_only,
    )
    start = time.perf_counter()
    recipe = calibrate(fe, calib, config)
    seconds = time.perf_counter() - start
    search = recipe.stats["w8a8"]["search"]
    for step in search[1:]:
        print(
            f"  {calib_set} {variant}: {step['ranking']:5} {step['float_linears']:3} float "
            f"{step.get('dynamic_linears', 0):3} per-token: "
            f"held-out divergence {step['ppl_increase_pct']:+.3f}% (95% bound {step['upper_95_pct']:+.3f}%)",
            flush=True,
        )
    floats, dynamic = recipe.float_linears, recipe.dynamic_linears
    quantized = fe.logits(recipe, verify=False)
    measured = {n: increase(window_nll(quantized, ids, 4, f"{variant} {n}") - nll_float[n]) for n, ids in texts.items()}
    del quantized
    all_int8 = search[1]
    chosen = next(
        s for s in search[1:] if (s["float_linears"], s.get("dynamic_linears", 0)) == (len(floats), len(dynamic))
    )
    row = common.table_row(
        [
            calib_set,
            variant,
            f"{len(floats)} ({100 * len(floats) / len(recipe.stats['w8a8']['range_ratio']):.1f}%)",
            str(len(dynamic)),
            f"{all_int8['ppl_increase_pct']:+.2f}%",
            f"{chosen['ppl_increase_pct']:+.2f}% / {chosen['upper_95_pct']:+.2f}%",
            *measured.values(),
            f"{seconds:.0f} s",
        ]
    )
    print(row, flush=True)
    print(f"  {calib_set} float: {', '.join(sorted(floats))}", flush=True)
    print(f"  {calib_set} per-token: {', '.join(sorted(dynamic))}", flush=True)
    return row


def main():
    args = parse_args()

    import torch

    from qpass.core.data import read_text, token_windows
    from qpass.core.evaluate import window_nll

    torch.manual_seed(0)
    fe = qpass.open_model(args.model, args.window)
    samples = {"": [False], "between": [True], "both": [False, True]}[args.samples]
    texts = {
        name + ("-between" if between else ""): common.eval_windows(
            fe.tokenizer, read_text(path, name), args.window, args.eval_windows, between
        )
        for between in samples
        for name, path in (("prose", args.prose), ("code", args.code))
    }
    float_module = fe.logits()
    nll_float = {name: window_nll(float_module, ids, 4, f"float {name}") for name, ids in texts.items()}
    print("float ppl " + ", ".join(f"{n} {math.exp(float(v.mean())):.4f}" for n, v in nll_float.items()), flush=True)
    rows = []
    for name in args.calib_sets:
        calib = token_windows(fe.tokenizer, calib_texts(name), args.window, args.calib_samples, "--calib-sets")
        print(f"calibration {name}: {calib.shape[0]} x {args.window}", flush=True)
        rows += [variant_row(fe, variant, calib, texts, nll_float, args, name) for variant in args.variants]
    common.print_table(
        [
            "calibration text",
            "variant (anti:act)",
            "Linears float",
            "Linears per-token",
            "held-out divergence, all-int8",
            "held-out divergence at the choice (estimate / 95% bound)",
            *(f"unseen {name}" for name in texts),
            "calibration",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
