"""qpass's W8A8 against llm-compressor's, same model, calibration tokens and evaluation windows (issue 26, item 3).

llm-compressor's ``oneshot`` with its W8A8 int8 example recipe (SmoothQuant at strength 0.8, then GPTQ with the
``W8A8`` scheme: int8 symmetric weights per output channel, int8 symmetric activations per token at run time,
``lm_head`` float) quantizes SmolLM2-135M (the Hugging Face directory ``--hf``, float32) in an environment of its
own (``.venv-llmc``: a benchmark, not a dependency of qpass), calibrated on the windows qpass's compile calibrates
on: the same ``--calib`` file cut by qpass's own reader into the same ``--calib-samples`` windows of ``--window``
tokens. Its compressed-tensors checkpoint is then read by qpass's vLLM-format reader and measured by qpass's
evaluator beside the float model and the qpass directories given (``--qpass``, compiled beforehand), every model
on the same ``--eval-windows`` windows of each evaluation text, each increase over float and each qpass directory
against llm-compressor paired per window (95% interval over the windows).

    python -m tools.bench_llmcompressor [--work out/bench-llmc] [--qpass out/w8a8-dynamic ...]
                                        [--weights gptq|rtn] [--eval out/corpus/eval_prose.txt ...]

``.venv-llmc`` is made on first use: torch 2.13.0 first (the CPU build; a looser requirement would pull CUDA's),
then ``llmcompressor==0.14.*``. Every model's per-window NLLs are kept in ``WORK/results.json``, and a model
already measured on a text is not measured again (delete the file to measure afresh).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from tools import common

ROOT = Path(__file__).resolve().parents[1]
LLMC_VENV = ROOT / ".venv-llmc"
LLMC_PYTHON = LLMC_VENV / "bin" / "python"
DRIVER = ROOT / "tools" / "llmc_driver.py"
LLMC_LABEL = "llm-compressor W8A8"


def llmc_env() -> None:
    """``.venv-llmc`` with llm-compressor 0.14 over the CPU build of torch, made where it is missing."""
    if LLMC_PYTHON.is_file():
        return
    subprocess.run([sys.executable, "-m", "venv", str(LLMC_VENV)], check=True)
    pip = [str(LLMC_VENV / "bin" / "pip"), "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # first: llmcompressor's own requirement would pull CUDA's
    subprocess.run([*pip, "llmcompressor==0.14.*"], check=True)


def llmcompressor(hf: Path, out: Path, calib, weights: str, work: Path) -> dict:
    """llm-compressor's W8A8 checkpoint of ``hf`` in ``out``, calibrated on ``calib [N, W]``: the driver's result."""
    job = work / f"llmc-job-{weights}.json"
    job.write_text(json.dumps({"model": str(hf), "out": str(out), "calib": calib.tolist(), "weights": weights}))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(LLMC_PYTHON), str(DRIVER), str(job)], capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    log = work / f"llmc-{weights}.log"
    log.write_text(done.stderr, encoding="utf-8")
    if done.returncode or not lines:
        raise SystemExit(f"llm-compressor failed (log: {log}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def saved_nll(directory: Path, ids, batch_size: int, tokenizer):
    """Per-window NLL ``[N]`` of a directory some exporter wrote (or another tool wrote in a format qpass reads), as
    ``qpass eval`` measures it (:func:`qpass.api.evaluate_saved`), on ``ids [N, W]``; refused where the directory's
    own tokenizer would cut text into other tokens than ``tokenizer`` (the float model's) does."""
    from qpass import frontends
    from qpass.core import saturation
    from qpass.exporters import registry

    exporter = registry.detect(directory)
    loaded = exporter.load(directory, "eval")
    probe = "def main() -> None:\n    print('Ünïcode', 3.14)  # the tokenizers must agree"
    if (
        loaded.tokenizer(probe, add_special_tokens=False)["input_ids"]
        != tokenizer(probe, add_special_tokens=False)["input_ids"]
    ):
        raise SystemExit(f"{directory}: its tokenizer is not the float model's; compile it from the same model")
    counted = saturation.counters(loaded.recipe) if loaded.recipe is not None else {}
    frontend = frontends.get(exporter.frontend)
    return frontend.saved_nll(loaded, directory, ids, batch_size, f"eval {directory.name}", counted)[0]


def label_of(directory: Path) -> str:
    """``qpass --w8a8 dynamic m3 (210 of 210 int8)``: a qpass directory named by its report's settings."""
    report = json.loads((directory / "report.json").read_text())
    config, w8a8 = report["config"], report.get("w8a8", {})
    mode = "dynamic" if config.get("w8a8") == "dynamic" else f"static, act {config.get('act_method')}"
    extra = f", {config['disable_level']}" if config.get("disable_level") not in (None, "L0") else ""
    int8 = f"{w8a8.get('quantized')} of {w8a8.get('linears')} int8"
    return f"qpass --w8a8 {mode}, {config.get('anti_method')}{extra} ({int8})"


def main() -> None:
    parser = common.parser(__doc__, "tools.bench_llmcompressor")
    parser.add_argument("--work", type=Path, default=Path("out/bench-llmc"), help="where models and results go")
    parser.add_argument("--hf", type=Path, default=Path("out/bench-vllm/smollm2"), help="the float model (HF dir)")
    parser.add_argument("--calib", type=Path, default=Path("out/corpus/calib.jsonl"), help="calibration file")
    parser.add_argument("--calib-samples", type=int, default=64, help="calibration windows (default 64)")
    parser.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument(
        "--eval",
        type=Path,
        nargs="+",
        default=[Path("out/corpus/eval_prose.txt"), Path("out/corpus/eval_code.txt")],
        help="evaluation texts",
    )
    parser.add_argument("--eval-windows", type=int, default=32, help="windows per evaluation text (default 32)")
    parser.add_argument(
        "--qpass", type=Path, nargs="*", default=[Path("out/w8a8-dynamic")], help="qpass directories to compare"
    )
    parser.add_argument(
        "--weights", choices=("gptq", "rtn"), default="gptq", help="llm-compressor's weight rounding (default gptq)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    import qpass
    from qpass.core import corpus
    from qpass.core.data import read_samples, read_text, token_windows

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not args.calib.is_file():
        corpus.write(args.calib.parent)  # python -m tools.make_corpus's three files
    hf = args.hf.resolve()
    if not (hf / "config.json").is_file():
        from qpass.models.loaders import load_model

        common.save_hf(load_model("default"), hf)
    tokenizer = AutoTokenizer.from_pretrained(hf)

    # the windows qpass's compile calibrates on (qpass.core.compile._windows, with --eval given: none held out)
    calib = token_windows(tokenizer, read_samples(args.calib), args.window, args.calib_samples, "--calib")
    llmc_dir = work / f"llmc-w8a8-{args.weights}"
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"nll": {}}
    if not (llmc_dir / "config.json").is_file():
        llmc_env()
        print(f"llm-compressor oneshot on {calib.shape[0]} windows of {calib.shape[1]} tokens ...", flush=True)
        results.setdefault("llmcompressor", {})[args.weights] = llmcompressor(hf, llmc_dir, calib, args.weights, work)
        results_file.write_text(json.dumps(results, indent=2))
    results.update(
        {
            "machine": os.uname().nodename,
            "calib": {"file": str(args.calib), "windows": int(calib.shape[0]), "window": int(calib.shape[1])},
            "threads": torch.get_num_threads(),
        }
    )
    models = {"float": None, f"{LLMC_LABEL} ({args.weights})": llmc_dir}
    models.update({label_of(d): d.resolve() for d in args.qpass})
    opened_float = None
    for path in args.eval:
        ids = token_windows(tokenizer, [read_text(path)], args.window, args.eval_windows, "--eval")
        done = results["nll"].setdefault(path.name, {})
        for label, directory in models.items():
            key = label if directory is None else f"{label} [{directory}]"
            if key in done and len(done[key]) == ids.shape[0]:
                continue
            print(f"{path.name}: {label} ...", flush=True)
            if directory is None:
                if opened_float is None:
                    opened_float = qpass.open_model(str(hf), args.window)
                nll = opened_float.window_nll(None, ids, args.batch_size, "eval float")
            else:
                nll = saved_nll(directory, ids, args.batch_size, tokenizer)
            done[key] = nll.tolist()
            results_file.write_text(json.dumps(results, indent=2))
    report(results, models, args)
    print(f"\nresults: {results_file}")


def report(results: dict, models: dict, args) -> None:
    """Perplexity and increase over float per model and text, then each qpass model against llm-compressor's, paired
    per window."""
    import torch

    llmc = f"{LLMC_LABEL} ({args.weights})"
    rows, paired = [], []
    for path in args.eval:
        done = results["nll"][path.name]
        nll = {
            label: torch.tensor(done[label if d is None else f"{label} [{d}]"], dtype=torch.float64)
            for label, d in models.items()
        }
        for label, v in nll.items():
            d = v - nll["float"]
            cells = [path.name, label, f"{float(torch.exp(v.mean())):.4f}"]
            cells.append("" if label == "float" else f"{common.pct_increase(d):+.3f}% ± {common.half_width(d):.3f}")
            rows.append(common.table_row(cells))
            if label not in ("float", llmc):
                d = v - nll[llmc]
                paired.append(
                    common.table_row(
                        [
                            path.name,
                            f"{label} - llm-compressor",
                            f"{common.pct_increase(d):+.3f}% ± {common.half_width(d):.3f}",
                        ]
                    )
                )
    windows = len(next(iter(results["nll"][args.eval[0].name].values())))
    common.print_table(["text", "model", f"ppl ({windows} windows of {args.window})", "increase vs float (95%)"], rows)
    common.print_table(["text", "paired", "difference in ppl (95%)"], paired)


if __name__ == "__main__":
    main()
