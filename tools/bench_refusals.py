"""Time to refusal: how soon `qpass compile` refuses a bad input or output path on SmolLM2 (issue 24, fail fast).

Each case runs the console script in a process of its own, as a user would, on SmolLM2-135M saved as a Hugging Face
directory (the weights hard-linked into each damaged copy, never rewritten), and prints the seconds to its one-line
refusal (Python's start and imports included) and whether the inputs were left as they were.

    python -m tools.bench_refusals [--work out/refusals] [--only WORDS ...]
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tools import common

NEWER_TOKENIZER = json.dumps({"version": "9.0", "model": {"type": "FromTheFuture", "vocab": {}}})


def _copy(hf: Path, dst: Path, config=None, files=None) -> Path:
    """A copy of ``hf`` (weights hard-linked), ``config(doc)`` editing config.json, ``files`` {name: text} replaced."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for f in hf.iterdir():
        if f.suffix == ".safetensors":
            os.link(f, dst / f.name)
        else:
            shutil.copy(f, dst / f.name)
    if config is not None:
        doc = json.loads((dst / "config.json").read_text())
        config(doc)
        (dst / "config.json").write_text(json.dumps(doc))
    for name, text in (files or {}).items():
        (dst / name).write_text(text)
    return dst


def _with_nan(hf: Path, dst: Path) -> Path:
    """A copy of ``hf`` whose first layer's k_proj weight is NaN (the weights rewritten, not linked)."""
    from safetensors.torch import load_file, save_file

    dst = _copy(hf, dst)
    tensors = load_file(hf / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"] * float("nan")
    (dst / "model.safetensors").unlink()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def cases(hf: Path, work: Path, calib: Path, only: list[str] | None = None) -> dict[str, list[str]]:
    """Each class of bad input (issue 24's list), as the arguments of one `qpass compile`."""
    base = ["--kv-int8", "--calib", str(calib)]
    dangling = work / "dangling"
    if not dangling.is_symlink():
        dangling.symlink_to(work / "nowhere")
    fewer, newer, vocab, typed, nan = (
        work / name for name in ("fewer-layers", "newer-tokenizer", "small-vocab", "typed-config", "nan-weights")
    )
    copies = {  # the damaged copies, made for the cases asked for
        fewer: lambda path: _copy(hf, path, config=lambda d: d.update(num_hidden_layers=29)),
        newer: lambda path: _copy(hf, path, files={"tokenizer.json": NEWER_TOKENIZER}),
        vocab: lambda path: _copy(hf, path, config=lambda d: d.update(vocab_size=1000)),
        typed: lambda path: _copy(hf, path, config=lambda d: d.update(num_attention_heads="9")),
        nan: lambda path: _with_nan(hf, path),
    }
    all_cases = {
        "output is the model directory (--force)": [str(hf), *base, "-o", str(hf), "--force"],
        "output is a dangling symbolic link": [str(hf), *base, "-o", str(dangling)],
        "--symmetric with the dynamic cache alone": [
            str(hf),
            "--kv-int8",
            "dynamic",
            "--symmetric",
            "-o",
            str(work / "o"),
        ],
        "--batch-size 10^20": [str(hf), *base, "--batch-size", str(10**20), "-o", str(work / "o")],
        "--format vllm-ascend with --fa-quant": [
            str(hf),
            "--w8a8",
            "--fa-quant",
            "--format",
            "vllm-ascend",
            "-o",
            str(work / "o"),
        ],
        "config.json declares fewer layers than the weights": [str(fewer), *base, "-o", str(work / "o")],
        "tokenizer.json from a newer release": [str(newer), *base, "-o", str(work / "o")],
        "tokenizer past the model's vocab_size": [str(vocab), *base, "-o", str(work / "o")],
        "layer-wise, fewer layers than the weights": [str(fewer), *base, "--layerwise", "-o", str(work / "o")],
        # issue 24's matrix
        "output is the current directory (-o . --force)": [str(hf), *base, "-o", ".", "--force"],
        "--percentile without --observer percentile": [str(hf), *base, "--percentile", "99.9", "-o", str(work / "o")],
        "--eval is the calibration file": [str(hf), *base, "--eval", str(calib), "-o", str(work / "o")],
        "config.json: a count of the wrong type": [str(typed), *base, "-o", str(work / "o")],
        "weights holding NaN": [str(nan), *base, "-o", str(work / "o")],
        "--disable-level L1000 (past the Linears)": [
            str(hf),
            "--w8a8",
            "--calib",
            str(calib),
            "--disable-level",
            "L1000",
            "-o",
            str(work / "o"),
        ],
    }
    picked = {name: flags for name, flags in all_cases.items() if not only or any(words in name for words in only)}
    for path, make in copies.items():
        if any(str(path) in flags for flags in picked.values()):
            make(path)
    return picked


def _fingerprint(path: Path) -> list:
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__, "tools.bench_refusals")
    p.add_argument("--work", type=Path, default=Path("out/refusals"), help="where the damaged copies go")
    p.add_argument(
        "--only", action="append", help="run only the cases whose name holds these words (repeatable: any of them)"
    )
    args = p.parse_args(argv)
    import qpass
    from qpass.core import corpus

    args.work.mkdir(parents=True, exist_ok=True)
    args.work = args.work.resolve()
    here = args.work / "cwd"  # where `-o .` points: an empty directory of the bench's own
    here.mkdir(exist_ok=True)
    hf = args.work / "smollm2"
    if not (hf / "config.json").is_file():
        common.save_hf(qpass.load_model("default"), hf)
    calib = args.work / "calib.txt"
    calib.write_text("\n".join(corpus.calibration_samples()[:8]), encoding="utf-8")
    rows = []
    for name, flags in cases(hf, args.work, calib, args.only).items():
        before = _fingerprint(hf)
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "qpass.cli", "compile", *flags], capture_output=True, text=True, cwd=here
        )
        seconds = time.perf_counter() - start
        kept = _fingerprint(hf) == before and not (args.work / "o").exists() and not any(here.iterdir())
        line = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "(nothing)"
        one_line = done.stderr.count("\n") == 1
        rows.append(
            common.table_row(
                [
                    name,
                    f"{seconds:.1f}",
                    str(done.returncode),
                    "yes" if one_line else "NO",
                    "yes" if kept else "NO",
                    line[:90],
                ]
            )
        )
    common.print_table(["case", "seconds to refusal", "exit", "one line", "inputs kept", "message"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
