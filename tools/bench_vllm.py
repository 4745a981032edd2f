"""vLLM serving qpass's int8 KV cache against vLLM's own cache, same model and prompts, in one run (issue 25).

SmolLM2-135M compiled with ``--format vllm`` (C8, and the dynamic cache), calibrated on the standard-library
calibration corpus, against the float model served by stock vLLM (qpass's plugin switched off), each engine in a
process of its own in vLLM's environment (``.venv-vllm``, ``make vllm-env``):

- capacity: tokens the KV cache holds in the same cache memory, bfloat16 model;
- speed: prefill and decode tokens/s at each batch size, every prompt ``--context`` tokens, bfloat16 model;
- accuracy: perplexity from vLLM's ``prompt_logprobs`` in float32 on prose and on code the calibration did not
  see, each quantized cache paired with the float cache on the same windows (95% interval over windows); vLLM's
  fp8 e4m3 cache beside them where this CPU has AVX-512 (vLLM refuses it on AVX2).

    python -m tools.bench_vllm [--work out/bench-vllm] [--batches 1 8 32] [--context 2048] [--decode 16]
                               [--parts capacity speed accuracy]
"""

import json
import os
import subprocess
from pathlib import Path

from tools import common

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
DRIVER = ROOT / "tools" / "vllm_driver.py"


def vllm(job: dict, work: Path, name: str, plugins: bool = True) -> dict:
    """The driver's result for ``job``, vLLM in a process of its own."""
    path = work / f"job-{name}.json"
    path.write_text(json.dumps(job), encoding="utf-8")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
    if not plugins:
        env["VLLM_PLUGINS"] = "none"  # vLLM loads only the plugins this names: stock vLLM
    done = subprocess.run([str(VLLM_PYTHON), str(DRIVER), str(path)], capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"vLLM ({name}) failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def fp8_possible() -> bool:
    import torch

    return torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()


def main() -> None:
    parser = common.parser(__doc__, "tools.bench_vllm")
    parser.add_argument("--work", type=Path, default=Path("out/bench-vllm"), help="where models and results go")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="decode batch sizes")
    parser.add_argument("--context", type=int, default=2048, help="prompt tokens per request (default 2048)")
    parser.add_argument("--decode", type=int, default=16, help="tokens decoded per request (default 16)")
    parser.add_argument("--windows", type=int, default=16, help="512-token windows per text (default 16)")
    parser.add_argument(
        "--parts", nargs="+", default=["capacity", "speed", "accuracy"], help="what to measure (default: all three)"
    )
    args = parser.parse_args()
    if not VLLM_PYTHON.is_file():
        raise SystemExit(f"{VLLM_PYTHON} is missing: run `make vllm-env` first")

    from qpass.core import corpus
    from qpass.models.loaders import load_model

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    texts = corpus.write(work / "corpus")
    hf = work / "smollm2"
    if not (hf / "config.json").is_file():
        common.save_hf(load_model("default"), hf)
    dirs = {"c8": ["--kv-int8"], "dynamic": ["--kv-int8", "dynamic"]}
    for name, flags in dirs.items():
        out = work / name
        if not (out / "config.json").is_file():
            common.compile_child(hf, out, [*flags, "--calib", str(texts["calib"]), "--format", "vllm", "--force"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf)
    models = {
        "bfloat16 (stock)": (hf, False),
        "qpass C8": (work / "c8", True),
        "qpass dynamic": (work / "dynamic", True),
    }
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}  # the parts not run again
    results.update({"machine": os.uname().nodename, "cpu_fp8": fp8_possible()})

    if "capacity" in args.parts:
        capacity(models, work, results)
    if "speed" in args.parts:
        speed(models, work, results, tokenizer, args)
    if "accuracy" in args.parts:
        accuracy(hf, work, texts, results, tokenizer, args)
    results_file.write_text(json.dumps(results, indent=2))
    print(f"\nresults: {results_file}")


def capacity(models: dict, work: Path, results: dict) -> None:
    """Tokens the cache holds in 256 MiB, bfloat16 model."""
    capacity = {}
    for label, (model, plugins) in models.items():
        job = {"model": str(model), "dtype": "bfloat16", "kv_cache_memory_bytes": 1 << 28, "max_model_len": 2048}
        got = vllm(job, work, f"capacity-{label.split()[-1]}", plugins)
        capacity[label] = got["cache"]["num_blocks"] * got["cache"]["block_size"]
    results["capacity_tokens"] = capacity
    common.print_table(
        ["cache", "tokens in 256 MiB", "x bfloat16"],
        [common.table_row([k, str(v), f"{v / capacity['bfloat16 (stock)']:.2f}"]) for k, v in capacity.items()],
    )


def speed(models: dict, work: Path, results: dict, tokenizer, args) -> None:
    """Prefill and decode tokens/s at each batch size, every prompt ``--context`` tokens, bfloat16 model."""
    import torch

    g = torch.Generator().manual_seed(0)
    needed = sum(args.batches)
    prompts = torch.randint(100, tokenizer.vocab_size - 100, (needed, args.context), generator=g).tolist()
    speed = {}
    for label in ("bfloat16 (stock)", "qpass C8"):
        model, plugins = models[label]
        job = {
            "model": str(model),
            "dtype": "bfloat16",
            "kv_cache_memory_bytes": 3 << 30,
            "max_model_len": args.context + args.decode + 8,
            "max_num_seqs": max(args.batches),
            "enable_prefix_caching": False,
            "bench": {"batches": args.batches, "decode": args.decode},
            "bench_prompts": prompts,
        }
        speed[label] = vllm(job, work, f"speed-{label.split()[-1]}", plugins)["bench"]
    results["speed"] = speed
    rows = []
    for i, b in enumerate(args.batches):
        base, ours = speed["bfloat16 (stock)"][i], speed["qpass C8"][i]
        rows.append(
            common.table_row(
                [
                    str(b),
                    f"{base['prefill_tokens_per_s']:.0f}",
                    f"{ours['prefill_tokens_per_s']:.0f}",
                    f"{base['decode_tokens_per_s']:.2f}",
                    f"{ours['decode_tokens_per_s']:.2f}",
                    f"{ours['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}",
                ]
            )
        )
    common.print_table(
        ["batch", "prefill tok/s bf16", "prefill tok/s C8", "decode tok/s bf16", "decode tok/s C8", "decode x"], rows
    )


def accuracy(hf: Path, work: Path, texts: dict, results: dict, tokenizer, args) -> None:
    """Perplexity in float32 on prose and code, each quantized cache paired with the float cache on the same windows."""
    import torch

    accuracy = {}
    kinds = {"float": (hf, False, "auto"), "qpass C8": (work / "c8", True, "auto")}
    kinds["qpass dynamic"] = (work / "dynamic", True, "auto")
    if results["cpu_fp8"]:
        kinds["vLLM fp8 e4m3"] = (hf, False, "fp8_e4m3")
    for text in ("prose", "code"):
        windows = common.eval_windows(tokenizer, Path(texts[text]).read_text(), 512, args.windows, False).tolist()
        nll = {}
        for label, (model, plugins, cache) in kinds.items():
            job = {"model": str(model), "logprobs": windows, "max_model_len": 1024, "kv_cache_memory_bytes": 1 << 28}
            if cache != "auto":
                job["kv_cache_dtype"] = cache
            got = vllm(job, work, f"acc-{text}-{label.split()[-1]}", plugins)
            nll[label] = torch.tensor(got["nll_sum"], dtype=torch.float64) / 511
        accuracy[text] = {
            label: {
                "ppl": float(torch.exp(v.mean())),
                "increase_pct": common.pct_increase(v - nll["float"]),
                "half_width_pct": common.half_width(v - nll["float"]),
            }
            for label, v in nll.items()
        }
        if "vLLM fp8 e4m3" in nll:  # qpass C8 against fp8, paired
            d = nll["qpass C8"] - nll["vLLM fp8 e4m3"]
            accuracy[text]["C8 - fp8"] = {"diff_pct": common.pct_increase(d), "half_width_pct": common.half_width(d)}
    results["accuracy"] = accuracy
    rows = [
        common.table_row([t, k, f"{v['ppl']:.4f}", f"{v['increase_pct']:+.3f} ± {v['half_width_pct']:.3f}"])
        for t, by in accuracy.items()
        for k, v in by.items()
        if "ppl" in v
    ]
    common.print_table(["text", "cache", "ppl (vLLM, float32)", "increase % vs float (95%)"], rows)
    if not results["cpu_fp8"]:
        print("\nvLLM's fp8 e4m3 cache: not measured; vLLM refuses it on a CPU without AVX-512 or AMX (this one)")


if __name__ == "__main__":
    main()
