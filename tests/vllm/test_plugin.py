"""``--format vllm`` served by vLLM with qpass's plugin (issue 25), checked against vLLM itself: vLLM for CPU runs in
its own environment (``.venv-vllm``, made by ``make test``: its pins conflict with the test environment's) through
``tools/vllm_driver.py``, one engine start per directory.

On a tiny Llama (head_dim 64, GQA 4/2) for C8, FAQuant + C8, W8A8 + FAQuant + C8 and the dynamic cache: vLLM
decodes qpass run's greedy tokens; its perplexity from ``prompt_logprobs`` in float32 equals ``qpass eval``'s within
0.05 %; each layer runs qpass's backend over an int8 cache. C8's bytes per token are half those of the bfloat16
cache vLLM gives the same model without quantized attention (the W8A8-only directory, which stock vLLM loads with
the plugin switched off).
"""

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from qpass.cli import main

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
DRIVER = ROOT / "tools" / "vllm_driver.py"
WINDOW, WINDOWS = 512, 4
PROMPT = "The tokenizer splits the text into words and"

if not VLLM_PYTHON.is_file():
    if os.environ.get("QPASS_REQUIRE_VLLM"):  # make test: the environment must be there
        raise RuntimeError(f"{VLLM_PYTHON} is missing; `make vllm-env` creates it")
    pytest.skip("vLLM's environment .venv-vllm is absent (`make test` creates it)", allow_module_level=True)


def run_vllm(tmp_path: Path, job: dict, plugins: bool = True, env: dict | None = None) -> dict:
    """The driver's result for ``job`` (vLLM in this process's stead, in its own environment); ``env`` adds to the
    driver's environment."""
    path = tmp_path / f"job-{len(list(tmp_path.glob('job-*')))}.json"
    path.write_text(json.dumps(job), encoding="utf-8")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    if not plugins:
        env["VLLM_PLUGINS"] = "none-but-stock-vllm"  # vLLM loads only the plugins named here: none
    proc = subprocess.run(
        [str(VLLM_PYTHON), str(DRIVER), str(path)], capture_output=True, text=True, env=env, timeout=900
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def compile_vllm(model: Path, text_files, out: Path, *flags) -> Path:
    args = ["compile", str(model), *flags, "--calib", str(text_files["calib"]), "--format", "vllm", "-o", str(out)]
    assert main([*args, "--window", "128", "--calib-samples", "8", "--eval-windows", "2"]) == 0
    return out


def qpass_generate(out: Path, capsys) -> str:
    assert main(["run", str(out), "--prompt", PROMPT, "--max-new-tokens", "8"]) == 0
    return capsys.readouterr().out.strip().splitlines()[0]


def qpass_perplexity(out: Path, text: Path, capsys, windows: int = WINDOWS) -> float:
    assert main(["eval", str(out), "--eval", str(text), "--eval-windows", str(windows), "--no-float", "--json"]) == 0
    return json.loads(capsys.readouterr().out)["ppl_quant"]


def eval_windows(out: Path, text: Path, windows: int = WINDOWS) -> list[list[int]]:
    from transformers import AutoTokenizer

    from qpass.core.data import token_windows

    tokenizer = AutoTokenizer.from_pretrained(out)
    return token_windows(tokenizer, [text.read_text(encoding="utf-8")], WINDOW, windows, "--eval").tolist()


@pytest.mark.parametrize(
    "flags",
    [("--kv-int8",), ("--fa-quant", "--kv-int8"), ("--w8a8", "--fa-quant", "--kv-int8"), ("--kv-int8", "dynamic")],
    ids=["c8", "faquant-c8", "w8a8-faquant-c8", "dynamic"],
)
def test_vllm_serves_what_qpass_runs(flags, tiny_head64_dir, text_files, tmp_path, capsys):
    from transformers import AutoTokenizer

    out = compile_vllm(tiny_head64_dir, text_files, tmp_path / "out", *flags)
    capsys.readouterr()
    text = qpass_generate(out, capsys)
    ppl = qpass_perplexity(out, text_files["prose"], capsys)
    tokenizer = AutoTokenizer.from_pretrained(out)
    windows = eval_windows(out, text_files["prose"])
    got = run_vllm(
        tmp_path,
        {
            "model": str(out),
            "generate": [tokenizer(PROMPT)["input_ids"]],
            "max_tokens": 8,
            "logprobs": windows,
            "max_model_len": 1024,
        },
    )
    assert got["backends"] == ["QpassInt8Impl"] and got["cache_dtypes"] == ["torch.int8"]
    assert PROMPT + tokenizer.decode(got["generated"][0]) == text
    vllm_ppl = math.exp(sum(n / (WINDOW - 1) for n in got["nll_sum"]) / len(got["nll_sum"]))
    assert abs(vllm_ppl / ppl - 1) < 5e-4, (vllm_ppl, ppl)


def test_continuous_batching_chunked_prefill_and_prefix_caching_decode_what_qpass_runs(
    tiny_head64_dir, text_files, tmp_path, capsys
):
    """vLLM's default scheduler over qpass's cache: prompts of different lengths in one batch, prefilled in chunks of
    16 tokens (blocks of 16), then prompts that extend the first batch's (their leading blocks from the prefix
    cache): every request decodes what ``qpass run`` decodes for its prompt alone."""
    from transformers import AutoTokenizer

    out = compile_vllm(tiny_head64_dir, text_files, tmp_path / "out", "--kv-int8")
    tokenizer = AutoTokenizer.from_pretrained(out)
    source = text_files["prose"].read_text(encoding="utf-8").split()
    first = [" ".join(source[:40]), " ".join(source[100:112]), " ".join(source[200:260])]
    after = [first[0] + " " + " ".join(source[40:50]), first[2] + " and"]
    capsys.readouterr()
    expected = []
    for prompt in first + after:
        assert main(["run", str(out), "--prompt", prompt, "--max-new-tokens", "6"]) == 0
        expected.append(capsys.readouterr().out.rstrip("\n").splitlines()[0])
    ids = lambda prompts: [tokenizer(p)["input_ids"] for p in prompts]  # noqa: E731
    job = {"model": str(out), "generate": ids(first), "generate_after": ids(after), "max_tokens": 6}
    got = run_vllm(tmp_path, {**job, "max_num_batched_tokens": 16, "block_size": 16, "max_num_seqs": 4})
    texts = [p + tokenizer.decode(g) for p, g in zip(first + after, got["generated"] + got["generated_after"])]
    assert texts == expected
    assert got["prefix_cache_hits"] >= 32  # the extended prompts' leading blocks came from the cache


@pytest.mark.parametrize(
    "flags", [("--kv-int8",), ("--w8a8", "--fa-quant", "--kv-int8")], ids=["c8", "w8a8-faquant-c8"]
)
def test_two_tensor_parallel_ranks_decode_what_one_does(flags, tiny_head64_dir, text_files, tmp_path, capsys):
    """``tensor_parallel_size=2`` on the CPU (one core per rank): each rank loads its own KV head's rows of every grid
    (and, with W8A8, its shard of each Linear) and the two decode qpass run's tokens, as one rank does."""
    from transformers import AutoTokenizer

    out = compile_vllm(tiny_head64_dir, text_files, tmp_path / "out", *flags)
    capsys.readouterr()
    text = qpass_generate(out, capsys)
    tokenizer = AutoTokenizer.from_pretrained(out)
    job = {"model": str(out), "generate": [tokenizer(PROMPT)["input_ids"]], "max_tokens": 8, "tp": 2}
    got = run_vllm(tmp_path, job, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    assert PROMPT + tokenizer.decode(got["generated"][0]) == text


def test_the_int8_cache_holds_twice_the_tokens_of_stock_vllms_bfloat16_cache(tiny_head64_dir, text_files, tmp_path):
    """The same cache memory: qpass's int8 blocks against the bfloat16 blocks that stock vLLM (plugin off) gives the
    W8A8-only directory, which it loads by compressed-tensors alone; with the plugin loaded that directory runs
    exactly as stock vLLM runs it (the plugin leaves models without qpass attention alone)."""
    c8 = compile_vllm(tiny_head64_dir, text_files, tmp_path / "c8", "--kv-int8")
    w8 = compile_vllm(tiny_head64_dir, text_files, tmp_path / "w8", "--w8a8")
    assert json.loads((w8 / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    job = {"generate": [[1, 2, 3]], "max_tokens": 2, "dtype": "bfloat16", "kv_cache_memory_bytes": 1 << 25}
    stock = run_vllm(tmp_path, {**job, "model": str(w8)}, plugins=False)
    untouched = run_vllm(tmp_path, {**job, "model": str(w8)})  # the plugin loaded: a model without qpass attention
    ours = run_vllm(tmp_path, {**job, "model": str(c8)})
    assert stock["cache_dtypes"] == ["torch.bfloat16"] and "QpassInt8Impl" not in stock["backends"]
    assert untouched["backends"] == stock["backends"] and untouched["cache"] == stock["cache"]
    assert untouched["generated"] == stock["generated"]
    assert ours["cache_dtypes"] == ["torch.int8"]
    per_token = {
        k: r["kv_cache_bytes"] / (r["cache"]["num_blocks"] * r["cache"]["block_size"])
        for k, r in (("stock", stock), ("ours", ours))
    }
    assert per_token["stock"] == 2 * per_token["ours"]
    assert ours["cache"]["num_blocks"] * ours["cache"]["block_size"] >= 1.9 * (
        stock["cache"]["num_blocks"] * stock["cache"]["block_size"]
    )


def test_vllm_serve_answers_a_completion_and_stops(tiny_head64_dir, text_files, tmp_path):
    """vLLM's OpenAI server on the directory as a real process: a completions request, then a clean stop."""
    import socket
    import time
    import urllib.request

    out = compile_vllm(tiny_head64_dir, text_files, tmp_path / "out", "--kv-int8")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # what `vllm serve DIR` runs; vllm-cpu's `vllm` command itself stops on its own version lookup (its
    # distribution is named vllm-cpu, the command asks for "vllm"): see the README's vllm caveats
    serve = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(out), "--port", str(port)]
    serve += ["--host", "127.0.0.1", "--enforce-eager", "--dtype", "float32", "--max-model-len", "256"]
    serve += ["--gpu-memory-utilization", "0.05", "--kv-cache-memory-bytes", str(1 << 26)]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 600
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "vllm serve did not start in 10 minutes"
                time.sleep(2)
        body = json.dumps({"model": str(out), "prompt": PROMPT, "max_tokens": 4, "temperature": 0}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"}
        )
        answer = json.loads(urllib.request.urlopen(request, timeout=120).read())
        assert answer["choices"][0]["text"] and answer["usage"]["completion_tokens"] == 4
    finally:
        proc.terminate()
        code = proc.wait(timeout=120)
    assert code in (0, -15), (tmp_path / "serve.log").read_text()[-3000:]
    assert "qpass" in (tmp_path / "serve.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags",
    [("--kv-int8",), ("--fa-quant", "--kv-int8"), ("--kv-int8", "dynamic")],
    ids=["c8", "faquant-c8", "dynamic"],
)
def test_smollm2_through_vllm_decodes_and_measures_what_qpass_does(flags, text_files, tmp_path, capsys):
    """SmolLM2-135M with C8, FAQuant + C8 and the dynamic cache: vLLM's greedy tokens are qpass run's, and its
    perplexity qpass eval's within 0.05 % over 32 windows of code. Not over fewer: vLLM's K and V equal qpass's to
    about 4e-6 (float32 kernels), and int8 rounding turns such differences into whole codes here and there, which
    move a window's loss by about 0.0013 nats (C8: standard deviation over windows; a 3e-7 relative change of
    qpass's own embeddings moves it as much), so the mean over 32 windows is within 0.023 % (one standard
    deviation; C8 measured -0.012 %)."""
    from transformers import AutoTokenizer

    out = tmp_path / "smollm2"
    args = ["compile", "default", *flags, "--calib", str(text_files["calib"]), "--calib-samples", "16"]
    assert main([*args, "--eval-windows", "2", "--format", "vllm", "-o", str(out)]) == 0
    capsys.readouterr()
    text = qpass_generate(out, capsys)
    ppl = qpass_perplexity(out, text_files["code"], capsys, windows=32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    windows = eval_windows(out, text_files["code"], windows=32)
    job = {"model": str(out), "generate": [tokenizer(PROMPT)["input_ids"]], "logprobs": windows}
    got = run_vllm(tmp_path, {**job, "max_model_len": 1024, "kv_cache_memory_bytes": 1 << 28})
    assert got["backends"] == ["QpassInt8Impl"] and got["cache_dtypes"] == ["torch.int8"]
    assert PROMPT + tokenizer.decode(got["generated"][0]) == text
    vllm_ppl = math.exp(sum(n / (WINDOW - 1) for n in got["nll_sum"]) / len(got["nll_sum"]))
    assert abs(vllm_ppl / ppl - 1) < 5e-4, (vllm_ppl, ppl)


def test_a_model_vllm_cannot_run_through_qpass_is_refused_in_one_line(tiny_head64_dir, text_files, tmp_path):
    """A qpass config that names a format version this plugin does not read: vLLM stops at start-up with the plugin's
    one line."""
    out = compile_vllm(tiny_head64_dir, text_files, tmp_path / "out", "--kv-int8")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (out / "config.json").write_text(json.dumps(config))
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"model": str(out), "generate": [[1, 2]]}))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([str(VLLM_PYTHON), str(DRIVER), str(job)], capture_output=True, text=True, env=env)
    assert proc.returncode != 0
    assert "format_version 99: this qpass reads version 1" in proc.stderr


def test_vllm_decodes_what_qpass_runs_with_dynamic_w8a8(tiny_head64_dir, text_files, tmp_path, capsys):
    """``--w8a8 dynamic`` with C8: vLLM runs the Linears as compressed-tensors' int8 with per-token dynamic
    activations (under qpass's method, which runs the int8 cache), and decodes what ``qpass run`` decodes."""
    from transformers import AutoTokenizer

    out = compile_vllm(tiny_head64_dir, text_files, tmp_path / "out", "--w8a8", "dynamic", "--kv-int8")
    capsys.readouterr()
    text = qpass_generate(out, capsys)
    tokenizer = AutoTokenizer.from_pretrained(out)
    job = {"model": str(out), "generate": [tokenizer(PROMPT)["input_ids"]], "max_tokens": 8, "max_model_len": 1024}
    got = run_vllm(tmp_path, job)
    assert got["backends"] == ["QpassInt8Impl"] and got["cache_dtypes"] == ["torch.int8"]
    assert PROMPT + tokenizer.decode(got["generated"][0]) == text


@pytest.mark.parametrize("flags", [(), ("--kv-int8",)], ids=["w8a8", "w8a8-c8"])
def test_vllm_runs_each_linear_with_its_groups_scheme(flags, tiny_head64_dir, text_files, tmp_path, capsys):
    """Static W8A8 with per-token Linears (whole fused groups: tests/helpers/mixed_w8a8.py), alone (stock vLLM's
    compressed-tensors) and with C8 (the same config under qpass's method): vLLM gives each layer, fused (qkv_proj,
    gate_up_proj) or not, the scheme of the config group that names its Linears, static input scale or per token,
    decodes qpass run's greedy tokens and measures qpass eval's perplexity."""
    from transformers import AutoTokenizer

    from tests.helpers.mixed_w8a8 import DYNAMIC, mixed_recipe_dir

    recipe = mixed_recipe_dir(tiny_head64_dir, text_files, tmp_path, *flags)
    out = tmp_path / "out"
    args = ["compile", str(tiny_head64_dir), "--recipe", str(recipe), "--format", "vllm", "-o", str(out)]
    assert main([*args, "--window", "128", "--eval-windows", "2"]) == 0
    capsys.readouterr()
    text = qpass_generate(out, capsys)
    ppl = qpass_perplexity(out, text_files["prose"], capsys)
    tokenizer = AutoTokenizer.from_pretrained(out)
    job = {"model": str(out), "generate": [tokenizer(PROMPT)["input_ids"]], "max_tokens": 8, "max_model_len": 1024}
    got = run_vllm(tmp_path, {**job, "logprobs": eval_windows(out, text_files["prose"])})
    expected = {}  # vLLM's layer -> [scheme, static input scale], by its first Linear's group
    for i in range(2):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        for layer, first in ((f"{a}.qkv_proj", f"{a}.q_proj"), (f"{m}.gate_up_proj", f"{m}.gate_proj")):
            expected[layer] = ["CompressedTensorsW8A8Int8", first not in DYNAMIC]
        for layer in (f"{a}.o_proj", f"{m}.down_proj"):
            expected[layer] = ["CompressedTensorsW8A8Int8", layer not in DYNAMIC]
    assert got["schemes"] == expected
    assert sorted(s for _, s in expected.values()) == [False] * 4 + [True] * 4  # both kinds, fused and not
    assert got["backends"] == (["QpassInt8Impl"] if flags else got["backends"])
    assert PROMPT + tokenizer.decode(got["generated"][0]) == text
    vllm_ppl = math.exp(sum(n / (WINDOW - 1) for n in got["nll_sum"]) / len(got["nll_sum"]))
    print(f"perplexity: vLLM {vllm_ppl:.6f}, qpass {ppl:.6f}")
    assert abs(vllm_ppl / ppl - 1) < 5e-4, (vllm_ppl, ppl)


MAPPED = """
import json, sys
from vllm.model_executor.models.utils import WeightsMapper
from qpass.exporters.vllm_format import _linear_config
from qpass.vllm.quantization import QpassConfig
linear = _linear_config(["model.layers.0.mlp.down_proj"], ["model.layers.0.self_attn.o_proj"], [])
doc = {"quant_method": "qpass", "format_version": 1, "kv_cache": "static", "fa_quant": False, "symmetric": False}
config = QpassConfig.from_config({**doc, "linear": linear})
config.apply_vllm_mapper(WeightsMapper(orig_to_new_prefix={"model.": "language_model.model."}))
print("RESULT " + json.dumps(sorted(config.linear.target_scheme_map)))
"""


def test_the_plugin_renames_the_module_paths_its_linear_groups_target():
    """vLLM renames checkpoint paths in the quantization config it built with the model's own mapping (a wrapped
    model's ``language_model.``): under qpass's method that is the compressed-tensors config inside, whose groups for
    static and per-token Linears target module paths."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([str(VLLM_PYTHON), "-c", MAPPED], capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    targets = json.loads(lines[-1].removeprefix("RESULT "))
    assert targets == ["language_model.model.layers.0.mlp.down_proj", "language_model.model.layers.0.self_attn.o_proj"]
