"""qpass on ONNX exports of SmolLM2-135M: accuracy, decode and prefill speed in ONNX Runtime, and pass times.

    python -m tools.bench_onnx prepare   --work out/onnx-bench    # the exports (about 2 minutes, 1.6 GB)
    python -m tools.bench_onnx accuracy  --work out/onnx-bench [--pairs mixed->source license->source]
                                         [--eval-windows 16]
    python -m tools.bench_onnx speed     --work out/onnx-bench [--context 2048] [--steps 32] [--repeats 5] [--threads 2]
    python -m tools.bench_onnx structure [--layers 80] [--model out/onnx-bench/dynamo20/model.onnx]

``prepare`` writes SmolLM2 as a Hugging Face directory, its ``torch.onnx.export(dynamo=True)`` decoder with KV I/O
(opset 20: MatMul-Softmax-MatMul) and onnxruntime-genai's builder model (GroupQueryAttention, fp32, CPU).

``accuracy`` per domain pair (:func:`qpass.core.corpus.domain_pairs`): the float ONNX perplexity against the PyTorch
model's; C8 and FAQuant through the QDQ form; symmetric C8 through GroupQueryAttention's int8 cache against the
builder's own int8 model fed the simplest scales (symmetric per-channel absmax of the same calibration windows),
both read token by token through ONNX Runtime's int8 cache; and whether greedy decoding on the int8 cache gives the
PyTorch path's tokens over 32 tokens.

``speed``: ONNX Runtime CPU, int8 cache against float cache, both in every repeat in alternating order: prefill of
``--context`` tokens, then ``--steps`` decode steps on that cache; medians and ratios, for the QDQ form and for GQA.

``structure``: load + site discovery + passes (C8, and FAQuant + C8) on a random SmolLM2-shaped graph of 80 layers
whose weights are external data and never read (structure only), and on ``--model`` (SmolLM2's 30 layers).
"""

import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import qpass
from qpass.core import corpus
from qpass.core.config import RunSettings
from tools import common

WINDOW = 512


def prepare(work: Path) -> None:
    from qpass.models.onnx_export import export_decoder

    hf, dynamo, genai = work / "hf", work / "dynamo20", work / "genai"
    loaded = qpass.load_model("default")
    if not (hf / "config.json").is_file():
        common.save_hf(loaded, hf)
    config = json.loads((hf / "config.json").read_text())
    if "quantization_config" in config:  # saved as null; the builder reads any such key as a dict
        del config["quantization_config"]
        (hf / "config.json").write_text(json.dumps(config, indent=2))
    if not (dynamo / "model.onnx").is_file():
        dynamo.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        export_decoder(loaded.model, dynamo / "model.onnx", opset=20)
        loaded.tokenizer.save_pretrained(dynamo)
        print(f"torch.onnx.export (dynamo, opset 20): {time.perf_counter() - start:.1f}s")
    if not (genai / "model.onnx").is_file():
        builder(hf, genai)


def builder(hf: Path, out: Path, extra: list[str] = ()) -> Path:
    """onnxruntime-genai's model builder, offline: ``-p fp32 -e cpu`` plus ``--extra_options extra``."""
    return common.genai_builder(hf, out, out.parent / f"{out.name}-cache", extra)


def ort_runner(model, site_docs: list[dict] | None = None, threads: int | None = None):
    """An ONNX Runtime CPU session of ``model`` (an onnx-ir model or a file) that steps the model's own KV cache; the
    site documents are the quantized model's own unless given (a float model's: its frontend's ``site_docs``)."""
    # internals: token-by-token runs on the int8 cache through ONNX Runtime, which the public API does not offer
    from qpass.frontends.onnx.pipeline import read_sites
    from qpass.frontends.onnx.session import Runner, session

    return Runner(session(model, threads), read_sites(model) if site_docs is None else site_docs)


def stepwise_nll(runner, windows, batch: int = 4):
    """Mean NLL per window ``[N]`` of ``windows [N, W]``, with every token fed one at a time on the cache the model
    returns (its int8 cache exercised)."""
    import torch

    per_window = []
    for rows in windows.split(batch):
        ids, past, logits = rows.numpy(), None, []
        for t in range(ids.shape[1] - 1):
            out, past = runner.step(ids[:, t : t + 1], past, t)
            logits.append(torch.from_numpy(out[:, -1]))
        logp = torch.log_softmax(torch.stack(logits, 1).double(), -1)
        per_window.append(-logp.gather(-1, rows[:, 1:, None])[..., 0].mean(1))
    return torch.cat(per_window)


def increase(nll, base) -> str:
    """``nll``'s perplexity increase over ``base`` (same windows), with the 95% half width over the windows."""
    diff = nll - base
    return f"{common.pct_increase(diff):+.3f}% (+-{common.half_width(diff):.3f})"


def accuracy(work: Path, pairs: list[str], eval_windows: int, calib_windows: int, parts: list[str]) -> None:
    from qpass.core.data import token_windows

    torch_fe = qpass.open_model("default", WINDOW)
    dynamo = qpass.open_model(work / "dynamo20", WINDOW)
    genai = qpass.open_model(work / "genai", WINDOW)
    tokenizer = dynamo.tokenizer
    all_pairs = corpus.domain_pairs()
    for name in pairs:
        samples, text = all_pairs[name]
        calib = token_windows(tokenizer, samples, WINDOW, calib_windows, "--calib")
        ids = token_windows(tokenizer, [text], WINDOW, eval_windows, "--eval")
        print(f"{name}: {calib.numel()} calibration tokens, {ids.numel()} evaluation tokens")
        if "qdq" in parts:
            qdq_modes(torch_fe, dynamo, calib, ids)
        if "gqa" in parts:
            gqa_modes(work, genai, calib, ids)
        sys.stdout.flush()
    if "greedy" in parts:
        greedy_tokens(torch_fe, dynamo, calib)


def qdq_modes(torch_fe, dynamo, calib, ids) -> None:
    from qpass.core.calibrate import calibrate
    from qpass.core.evaluate import perplexity

    ppl_torch = torch_fe.reference_perplexity(ids, 4)
    ppl_onnx = perplexity(dynamo.logits(), ids, 4, "onnx float")
    print(f"  float: PyTorch {ppl_torch:.4f}, ONNX {ppl_onnx:.4f} ({100 * (ppl_onnx / ppl_torch - 1):+.4f}%)")
    for mode, kwargs in (
        ("C8", dict(kv_cache="static")),
        ("FAQuant", dict(fa_quant=True)),
        ("C8 symmetric", dict(kv_cache="static", symmetric=True)),
    ):
        recipe = calibrate(dynamo, calib, qpass.QuantConfig(**kwargs))
        ppl = perplexity(dynamo.logits(recipe), ids, 4, f"onnx {mode}")
        print(f"  QDQ {mode}: {100 * (ppl / ppl_onnx - 1):+.3f}%")
        del recipe
        gc.collect()


def gqa_modes(work: Path, genai, calib, ids) -> None:
    """Through GroupQueryAttention's int8 cache, token by token: qpass centred (``--kv-int8``, the default) and
    symmetric (``--symmetric``), and the builder's own int8 model fed absmax scales; paired differences."""
    from qpass.core.calibrate import calibrate

    float_nll = stepwise_nll(ort_runner(genai.model, genai.site_docs), ids)
    print(f"  GQA float, token by token: ppl {float(float_nll.mean().exp()):.4f}", flush=True)
    nll = {}
    for label, config in (
        ("qpass centred (--kv-int8)", qpass.QuantConfig(kv_cache="static")),
        ("qpass symmetric (--symmetric)", qpass.QuantConfig(kv_cache="static", symmetric=True)),
    ):
        quantized, _ = genai.apply(calibrate(genai, calib, config))
        nll[label] = stepwise_nll(ort_runner(quantized), ids)
        print(f"  GQA int8 cache, {label}: {increase(nll[label], float_nll)}", flush=True)
        del quantized
        gc.collect()
    absmax = calibrate(genai, calib, qpass.QuantConfig(kv_cache="static", symmetric=True, observer="minmax"))
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        scale_file = Path(tmp) / "scales.json"
        layers = range(len(genai.attention_sites()))
        scale_file.write_text(
            json.dumps(
                {
                    "scales": {
                        f"{kind}_scales": [absmax.get(i, f"kv_{kind}")[0].tolist() for i in layers]
                        for kind in ("k", "v")
                    }
                }
            )
        )
        theirs = builder(
            work / "hf",
            Path(tmp) / "int8",
            ["kv_cache_quant_scheme=int8_per_channel", f"kv_cache_scale_file={scale_file}"],
        )
        builder_nll = stepwise_nll(ort_runner(theirs / "model.onnx", genai.site_docs), ids)
    print(f"  GQA int8 cache, builder with absmax scales: {increase(builder_nll, float_nll)}")
    for label, ours in nll.items():
        diff = ours - builder_nll
        print(f"  paired, {label} - builder: {100 * float(diff.mean()):+.3f} points (+-{common.half_width(diff):.3f})")


def greedy_tokens(torch_fe, dynamo, calib) -> None:
    import torch

    from qpass.core.calibrate import calibrate
    from qpass.core.data import token_windows
    from qpass.frontends.onnx.session import greedy  # an internal, as ort_runner() says

    tokenizer = dynamo.tokenizer
    prompt = token_windows(tokenizer, [corpus.eval_code()], WINDOW, 1, "--eval")[0, :16].tolist()
    for mode, kwargs in (("C8", dict(kv_cache="static")), ("FAQuant+C8", dict(fa_quant=True, kv_cache="static"))):
        recipe = calibrate(dynamo, calib, qpass.QuantConfig(**kwargs))
        quantized, _ = dynamo.apply(recipe)
        ours = greedy(ort_runner(quantized), prompt, 32)
        program, seq = torch_fe.logits(recipe), list(prompt)
        with torch.no_grad():
            for _ in range(32):  # the capture takes WINDOW tokens; attention is causal, so padding after is inert
                seq.append(int(program(torch.tensor([seq + [0] * (WINDOW - len(seq))]))[0, len(seq) - 1].argmax()))
        same = sum(a == b for a, b in zip(ours, seq[len(prompt) :]))
        print(f"greedy 32 tokens on the int8 cache, {mode}: {same}/32 the PyTorch path's tokens")


def timed_decode(runner, context: np.ndarray, steps: int) -> tuple[float, float]:
    """``(prefill seconds, seconds per decode step)`` of ``context [1, T]`` then ``steps`` greedy tokens."""
    start = time.perf_counter()
    logits, past = runner.step(context, None, 0)
    prefill = time.perf_counter() - start
    token, length = int(logits[0, -1].argmax()), context.shape[1]
    start = time.perf_counter()
    for _ in range(steps):
        logits, past = runner.step(np.array([[token]], dtype=np.int64), past, length)
        token, length = int(logits[0, -1].argmax()), length + 1
    return prefill, (time.perf_counter() - start) / steps


def speed(work: Path, context_len: int, steps: int, repeats: int, threads: int, forms: list[str]) -> None:
    from qpass.core.calibrate import calibrate
    from qpass.core.data import token_windows

    dynamo = qpass.open_model(work / "dynamo20", WINDOW)
    genai = qpass.open_model(work / "genai", WINDOW)
    calib = common.calib_windows(dynamo.tokenizer, WINDOW, 8, "--calib")
    context = token_windows(dynamo.tokenizer, [corpus.eval_code()], context_len, 1, "--eval").numpy()
    static = qpass.QuantConfig(kv_cache="static")
    forms_all = (
        ("QDQ (torch.onnx, MatMul attention)", dynamo, {"int8": static}),
        (
            "GroupQueryAttention (onnxruntime-genai)",
            genai,
            {"int8 centred": static, "int8 symmetric": qpass.QuantConfig(kv_cache="static", symmetric=True)},
        ),
    )
    for form, frontend, configs in (f for f, key in zip(forms_all, ("qdq", "gqa"), strict=True) if key in forms):
        runners = {"float": ort_runner(frontend.model, frontend.site_docs, threads)}
        for name, config in configs.items():
            quantized, _ = frontend.apply(calibrate(frontend, calib, config))
            runners[name] = ort_runner(quantized, threads=threads)
            del quantized
        names = list(runners)
        times = {name: ([], []) for name in names}
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:  # each repeat starts with another
                prefill, decode = timed_decode(runners[name], context, steps)
                times[name][0].append(prefill)
                times[name][1].append(decode)
        med = {name: (statistics.median(p), statistics.median(d)) for name, (p, d) in times.items()}
        print(f"{form}, {context_len}-token context, {threads} threads, {repeats} rotating repeats (medians):")
        for name in names[1:]:
            print(
                f"  {name}: prefill float {med['float'][0]:.3f}s, int8 {med[name][0]:.3f}s, ratio "
                f"{med[name][0] / med['float'][0]:.2f}x; decode float {1000 * med['float'][1]:.2f} ms/token, int8 "
                f"{1000 * med[name][1]:.2f} ms/token, ratio {med[name][1] / med['float'][1]:.2f}x"
            )
        del runners
        gc.collect()


def placeholder_scales(sites) -> dict:
    """FAQuant and C8 scale and offset tensors of ``sites`` by recipe key, every scale 0.05 (structure only)."""
    import torch

    from qpass.core.recipe import site_key

    tensors = {}
    for s in sites:
        for kind, heads in (("q", s.num_heads), ("k", s.num_kv_heads), ("v", s.num_kv_heads)):
            tensors[site_key(s.layer, f"fa_{kind}", "scale")] = torch.full((heads, s.head_dim), 0.05)
            tensors[site_key(s.layer, f"fa_{kind}", "offset")] = torch.zeros(heads, s.head_dim)
            if kind != "q":
                tensors[site_key(s.layer, f"kv_{kind}", "scale")] = torch.full((heads * s.head_dim,), 0.05)
                tensors[site_key(s.layer, f"kv_{kind}", "offset")] = torch.zeros(heads * s.head_dim)
    return tensors


def time_compile(path: Path, label: str) -> None:
    """Load + shape inference + sites, then the C8 + FAQuant passes with placeholder scales (structure only)."""
    from qpass.core.recipe import geometry

    # internals: what is timed is the ONNX frontend's loading and its pass pipeline themselves
    from qpass.frontends.onnx.load import load_decoder
    from qpass.frontends.onnx.pipeline import quantize_model

    start = time.perf_counter()
    graph, found = load_decoder(path)  # external weights stay on disk: onnx-ir reads them lazily
    loaded_s = time.perf_counter() - start
    sites = [s for s, _ in found]
    tensors = placeholder_scales(sites)
    for config in (qpass.QuantConfig(kv_cache="static"), qpass.QuantConfig(fa_quant=True, kv_cache="static")):
        graph, found = load_decoder(path)
        recipe = qpass.Recipe(
            config, geometry(sites), {k: v for k, v in tensors.items() if config.fa_quant or ".kv_" in k}
        )
        start = time.perf_counter()
        _, counts = quantize_model(graph, found, recipe, verify=False)
        passes_s = time.perf_counter() - start
        print(
            f"{label}: load + shape inference + sites {loaded_s:.2f}s, passes {passes_s:.2f}s, "
            f"total {loaded_s + passes_s:.2f}s; {counts}"
        )


def structure(layers: list[int], model: Path | None) -> None:
    from qpass.models.onnx_export import export_decoder

    if model is not None:
        time_compile(model, str(model))
    for n in layers:
        net = common.smollm2_shaped(n)
        with tempfile.TemporaryDirectory() as tmp:
            time_compile(export_decoder(net, Path(tmp) / "model.onnx", opset=20, external_data=True), f"{n} layers")


def main() -> None:
    parser = common.parser(__doc__, __spec__.name)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("prepare", "accuracy", "speed"):
        p = sub.add_parser(name)
        p.add_argument("--work", type=Path, default=Path("out/onnx-bench"))
    acc = sub.choices["accuracy"]
    acc.add_argument("--pairs", nargs="+", default=["mixed->source", "mixed->docstrings", "license->source"])
    acc.add_argument("--eval-windows", type=int, default=16)
    acc.add_argument("--parts", nargs="+", default=["qdq", "gqa", "greedy"], choices=["qdq", "gqa", "greedy"])
    acc.add_argument("--calib-windows", type=int, default=RunSettings.calib_samples)
    sp = sub.choices["speed"]
    sp.add_argument("--context", type=int, default=2048)
    sp.add_argument("--steps", type=int, default=32)
    sp.add_argument("--repeats", type=int, default=5)
    sp.add_argument("--threads", type=int, default=2)
    sp.add_argument("--forms", nargs="+", default=["qdq", "gqa"], choices=["qdq", "gqa"])
    st = sub.add_parser("structure")
    st.add_argument("--layers", type=int, nargs="*", default=[80])
    st.add_argument("--model", type=Path, help="also time this ONNX model (e.g. out/onnx-bench/dynamo20/model.onnx)")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.work)
    elif args.command == "accuracy":
        accuracy(args.work, args.pairs, args.eval_windows, args.calib_windows, args.parts)
    elif args.command == "speed":
        speed(args.work, args.context, args.steps, args.repeats, args.threads, args.forms)
    else:
        structure(args.layers, args.model)


if __name__ == "__main__":
    main()
