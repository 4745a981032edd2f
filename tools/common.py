"""What several tools share: their argument parser, the corpus windows, the 95% interval over windows, peak memory,
child processes (``qpass`` or a tool's own step) that report one JSON line, onnxruntime-genai's builder, random
SmolLM2-shaped Llamas, SmolLM2 saved as a Hugging Face directory, and markdown tables.

Only the standard library loads at import, so that a tool's ``--help`` answers at once; torch loads when used.
Run as ``python -m tools.common ARGS`` it is the child :func:`compile_child` starts: ``qpass ARGS``, then one JSON line.
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def parser(doc: str, module: str) -> argparse.ArgumentParser:
    """The parser of the tool ``module`` (``tools.NAME``): ``python -m tools.NAME`` in its usage line, the first
    paragraph of its docstring ``doc`` as description."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])


def add_model_options(parser: argparse.ArgumentParser, window: int = 512) -> None:
    """``--model`` (what :func:`qpass.open_model` opens, SmolLM2-135M by default) and ``--window``."""
    parser.add_argument(
        "--model",
        default="default",
        help="`default` (SmolLM2-135M), a Hugging Face directory, a .gguf or an ONNX model",
    )
    parser.add_argument("--window", type=int, default=window, help="tokens per window (default: %(default)s)")


def calib_windows(tokenizer, window: int, count: int | None, flag: str = "calib"):
    """``[count, window]`` token ids of the standard-library calibration corpus (``flag`` names them in errors)."""
    from qpass.core import corpus
    from qpass.core.data import token_windows

    return token_windows(tokenizer, corpus.calibration_samples(), window, count, flag)


def eval_windows(tokenizer, text: str, window: int, count: int, between: bool):
    """``count`` windows ``[count, window]`` spread over ``text`` as calibration spreads them, or (``between``) the
    ``count - 1`` halfway between those: a second, disjoint sample of the same text."""
    import torch

    from qpass.core.data import token_windows

    ids = token_windows(tokenizer, [text], window, None, "eval")
    if ids.shape[0] < (2 * count if between else count + 1):
        if between:
            raise SystemExit(f"--between: the text has {ids.shape[0]} windows, too few for {count} between {count}")
        return ids
    pick = torch.linspace(0, ids.shape[0] - 1, count)
    if between:
        pick = pick[:-1] + (pick[1] - pick[0]) / 2
    return ids[pick.round().long()]


def pct_increase(diff) -> float:
    """The perplexity increase in percent from per-window NLL differences ``diff [N]``."""
    return 100.0 * math.expm1(float(diff.mean()))


def half_width(diff) -> float:
    """The 95% half width of the mean of ``diff [N]`` over the windows (1.96 standard errors), in percent points
    of NLL: how much the figure would move on other windows of the same text (nan for one window)."""
    return 100.0 * 1.96 * float(diff.std()) / math.sqrt(len(diff)) if len(diff) > 1 else float("nan")


def peak_rss_gib(children: bool = False) -> float:
    """The peak resident memory (``ru_maxrss``) of this process, or of the largest child waited for, in GiB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss / 2**20


def physical_memory_gib() -> float:
    """This machine's memory in GiB."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30


def run_json(argv: list[str], what: str) -> tuple[dict, str]:
    """``python ARGV`` in a child process: its last stdout line read as JSON, and its stderr (exits naming ``what``
    with the end of that stderr when the child fails)."""
    done = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def compile_child(model: Path, out: Path, flags: list[str]) -> tuple[dict, dict]:
    """``qpass compile MODEL FLAGS -o OUT`` in a child process: its JSON line (``seconds``, ``peak_rss_gib``, and
    ``notes``: the lines of its stderr that mention ``--layerwise``) and the report it wrote."""
    run, stderr = run_json(
        ["-m", "tools.common", "compile", model, *flags, "-o", out], f"qpass compile {model} {' '.join(flags)}"
    )
    run["notes"] = [line for line in stderr.splitlines() if "--layerwise" in line]
    return run, json.loads((Path(out) / "report.json").read_text())


def qpass_child(argv: list[str]) -> None:
    """Runs in the child: ``qpass`` with ``argv``, then one JSON line with its wall time and peak RSS."""
    import torch  # noqa: F401  (loaded before the clock starts: the time is qpass's, not the import's)

    from qpass.cli import main as qpass_main

    start = time.perf_counter()
    status = qpass_main(argv)
    print(
        json.dumps(
            {
                "status": status,
                "seconds": round(time.perf_counter() - start, 1),
                "peak_rss_gib": round(peak_rss_gib(), 3),
            }
        )
    )


def genai_builder(hf: Path, out: Path, cache: Path, extra: list[str] = ()) -> Path:
    """onnxruntime-genai's model builder on the Hugging Face directory ``hf``, offline, ``-p fp32 -e cpu`` (plus
    ``--extra_options EXTRA``), into ``out``; ``out``."""
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(hf),
        "-o",
        str(out),
        "-p",
        "fp32",
        "-e",
        "cpu",
        "-c",
        str(cache),
    ]
    if extra:
        cmd += ["--extra_options", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the onnxruntime-genai builder failed:\n{done.stderr[-3000:]}")
    return out


def smollm2_shaped(num_layers: int):
    """A random Llama (seed 0, ``torch.nn.Module`` in eval mode) with SmolLM2's attention geometry: hidden 576,
    9 heads of 64, 3 KV heads; small MLP and vocabulary (256, 512)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=256,
        num_hidden_layers=num_layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=512,
        max_position_embeddings=256,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def save_hf(loaded, path: Path | str) -> None:
    """``loaded`` (a :class:`qpass.models.loaders.LoadedModel`; SmolLM2 read from GGUF) saved as a plain Hugging Face
    directory: safetensors, config and tokenizer, without the GGUF loader's quantization settings."""
    loaded.model.hf_quantizer = None
    loaded.model.config.quantization_config = None
    if hasattr(loaded.model.config, "quantization_config"):
        del loaded.model.config.quantization_config
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)


def table_row(cells: list[str]) -> str:
    """``| a | b |``: one row of a markdown table."""
    return "| " + " | ".join(cells) + " |"


def print_table(header: list[str], rows: list[str]) -> None:
    """A markdown table after a blank line: ``header``, its rule, then ``rows`` (made by :func:`table_row`)."""
    print("\n" + table_row(header))
    print("|---" * len(header) + "|")
    print("\n".join(rows))


if __name__ == "__main__":
    qpass_child(sys.argv[1:])
