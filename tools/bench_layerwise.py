"""Layer-wise calibration (issue 13): peak memory against depth, and time against the whole-model path.

    python -m tools.bench_layerwise rss  [--layers 4 32] [--windows 8] [--window 256]
                                         [--config kv|w8a8|w8a8-mindie]
    python -m tools.bench_layerwise time [--windows 32] [--window 512]
    python -m tools.bench_layerwise large [--layers 54] [--windows 2] [--window 512] [--dir DIR]
                                          [--config kv|w8a8-mindie]
    python -m tools.bench_layerwise auto [--eval out/corpus/eval_prose.txt] [--calib-samples 14]
    python -m tools.bench_layerwise onnx [--work out/onnx-bench] [--eval out/corpus/eval_prose.txt]
    python -m tools.bench_layerwise onnx-rss [--layers 4 32] [--windows 8] [--window 256]
    python -m tools.bench_layerwise onnx-large [--layers 24] [--windows 2] [--window 512] [--dir DIR]

``rss``: random-weight Llamas of the same width (hidden 2048, 16 heads, 8 KV heads, intermediate 5632, vocabulary
32000), one per depth, written straight to sharded bfloat16 safetensors (one shard per layer, never the whole
model in memory); each is calibrated layer-wise for C8 (or, ``--config w8a8``, W8A8 + C8 with m1 smoothing: every
Linear's input observed and every layer smoothed; ``w8a8-mindie``: then its float16 MindIE directory written layer by
layer; in a child process) and the child's peak resident memory (``ru_maxrss``) is reported. Target: RSS(32 layers) /
RSS(4 layers) <= 1.3.

``time``: SmolLM2-135M (``load_model("default")``, float32) saved as a Hugging Face directory, then C8 + FAQuant
calibrated from that directory by the whole-model path (load, capture, calibrate) and layer-wise (read, capture
one layer, calibrate), each in its own child process. Target: layer-wise <= 1.3x the whole-model path.

``large``: a random-weight Llama wider than the ``rss`` ones (hidden 5120, 40 heads, 8 KV heads, intermediate
13824, as Llama-2-13B; 54 layers are about 30 GB in bfloat16), written to ``--dir`` (a temporary directory by
default; the disk needs its size free), then ``qpass compile DIR --kv-int8`` in a child process without
``--layerwise``: the weights exceed this machine's memory, so qpass must choose layer-wise calibration itself
(``--config w8a8-mindie``: ``--w8a8 --kv-int8 --anti-method m1 --format mindie`` instead, the MindIE directory
written layer by layer). Prints the child's peak resident memory (``ru_maxrss`` of the children), the time per
layer and the note qpass printed. Target: it compiles within the machine's memory.

``auto``: SmolLM2 saved as a Hugging Face directory, then ``qpass compile DIR --w8a8 --fa-quant --kv-int8
--disable-level auto --max-ppl-increase 2 --anti-method m3 --act-method 3 --calib-samples 14 --eval FILE`` whole-model
and with ``--layerwise`` (each in its own child process): the float Linears, the ranking searched, the evaluation
(float and quantized perplexity, measured layer by layer in the layer-wise run), the time and the peak RSS of each.

``onnx``: SmolLM2's two ONNX exports (``python -m tools.bench_onnx prepare --work DIR``: torch.onnx opset 20 with
FAQuant + C8, onnxruntime-genai's builder model with C8) through ``qpass compile --eval`` whole and with
``--layerwise`` (ONNX Runtime one layer's stage at a time), each in its own child process: time, peak RSS, the
perplexities, and whether the recipe and ``model.onnx`` are the same bytes.

``onnx-rss``: the ``rss`` Llamas (hidden 2048) turned into ONNX by onnxruntime-genai's builder (``-p fp32 -e cpu``:
float32 weights as external data, 4.4 GiB at 32 layers), then ``qpass compile --kv-int8`` with ``--layerwise`` and
whole, in child processes. Target: RSS(32 layers) / RSS(4 layers) <= 1.3 layer-wise.

``onnx-large``: a random Llama at the ``large`` width turned into ONNX by the builder (24 layers: about 27.7 GB of
float32 external data, more than this machine's 23.5 GiB), then ``qpass compile MODEL --kv-int8`` without
``--layerwise``: qpass must choose to run it one layer at a time. The bfloat16 directory is deleted once the builder
is done.
"""

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import qpass
from tools import common

HIDDEN, HEADS, KV_HEADS, INTERMEDIATE, VOCAB = 2048, 16, 8, 5632, 32000


def write_random_llama(
    path: Path,
    layers: int,
    hidden: int = HIDDEN,
    heads: int = HEADS,
    kv_heads: int = KV_HEADS,
    intermediate: int = INTERMEDIATE,
) -> int:
    """A random-weight Llama of ``layers`` layers as bfloat16 safetensors, one shard per layer; returns its bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from qpass.models.tiny import byte_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    head_dim = hidden // heads
    shapes = {
        "self_attn.q_proj.weight": (hidden, hidden),
        "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (intermediate, hidden),
        "mlp.up_proj.weight": (intermediate, hidden),
        "mlp.down_proj.weight": (hidden, intermediate),
    }
    generator = torch.Generator().manual_seed(0)
    shards = [{"model.embed_tokens.weight": (VOCAB, hidden)}]
    shards += [
        {f"model.layers.{i}.{name}": shape for name, shape in shapes.items()}
        | {
            f"model.layers.{i}.input_layernorm.weight": (hidden,),
            f"model.layers.{i}.post_attention_layernorm.weight": (hidden,),
        }
        for i in range(layers)
    ]
    shards += [{"model.norm.weight": (hidden,), "lm_head.weight": (VOCAB, hidden)}]
    weight_map, total = {}, 0
    for n, shard in enumerate(shards):
        file = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {
            name: (
                torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) / shape[-1] ** 0.5
            ).to(torch.bfloat16)
            for name, shape in shard.items()
        }
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * 2 for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total


def child(mode: str, path: str, windows: int, window: int, config_kind: str) -> None:
    """Runs in the child: calibrate ``path`` (``mode`` layerwise or whole) and print one JSON line."""
    from qpass.core.calibrate import calibrate

    w8a8 = dict(w8a8=True, anti_method="m1") if config_kind.startswith("w8a8") else {}
    config = qpass.QuantConfig(kv_cache="static", fa_quant=config_kind == "fa", **w8a8)
    start = time.perf_counter()
    frontend = qpass.open_model(path, window, layerwise=mode == "layerwise")
    ids = common.calib_windows(frontend.tokenizer, window, windows)
    frontend.attention_sites()
    loaded = time.perf_counter()
    recipe = calibrate(frontend, ids, config)  # as qpass compile calibrates (layer by layer for a layer-wise frontend)
    done = time.perf_counter()
    if config_kind == "w8a8-mindie":  # the MindIE directory too, written layer by layer from the checkpoint
        import torch

        # an internal: the MindIE writer fed the layer-wise frontend's lazily read checkpoint, one layer at a time
        from qpass.exporters.mindie_write import export_mindie_by_layer

        with tempfile.TemporaryDirectory(prefix="qpass-bench-mindie-") as out:
            export_mindie_by_layer(frontend.config_json(), frontend.state_dict(), recipe, None, out, torch.float16)
    written = time.perf_counter()
    print(
        json.dumps(
            {
                "mode": mode,
                "tokens": int(ids.numel()),
                "load_capture_s": round(loaded - start, 2),
                "calibrate_s": round(done - loaded, 2),
                "write_s": round(written - done, 2),
                "total_s": round(written - start, 2),
                "peak_rss_gib": round(common.peak_rss_gib(), 3),
            }
        )
    )


def run_child(*args) -> dict:
    """:func:`child` with ``args`` in a child process: its JSON line."""
    return common.run_json(["-m", "tools.bench_layerwise", "_child", *args], f"child {args}")[0]


def bench_rss(args) -> None:
    results = {}
    with tempfile.TemporaryDirectory(prefix="qpass-bench-layerwise-") as tmp:
        for layers in args.layers:
            path = Path(tmp) / f"llama-{layers}"
            size = write_random_llama(path, layers)
            result = run_child("layerwise", path, args.windows, args.window, args.config)
            results[layers] = result
            print(
                f"{layers:3d} layers ({size / 2**30:.2f} GiB bf16): peak RSS {result['peak_rss_gib']:.3f} GiB, "
                f"load+capture {result['load_capture_s']:.1f}s, calibrate {result['calibrate_s']:.1f}s "
                f"({result['calibrate_s'] / layers:.2f}s/layer, {result['tokens']} tokens)"
                + (f", MindIE directory written in {result['write_s']:.1f}s" if result["write_s"] else ""),
                flush=True,
            )
            shutil.rmtree(path)
    low, high = min(args.layers), max(args.layers)
    ratio = results[high]["peak_rss_gib"] / results[low]["peak_rss_gib"]
    print(f"RSS({high} layers) / RSS({low} layers) = {ratio:.3f} (target <= 1.3)")


def bench_time(args) -> None:
    with tempfile.TemporaryDirectory(prefix="qpass-bench-layerwise-") as tmp:
        common.save_hf(qpass.load_model("default"), tmp)  # SmolLM2-135M, float32
        whole = run_child("whole", tmp, args.windows, args.window, "fa")
        lw = run_child("layerwise", tmp, args.windows, args.window, "fa")
    for r in (whole, lw):
        print(
            f"{r['mode']:>9}: load+capture {r['load_capture_s']:.1f}s, calibrate {r['calibrate_s']:.1f}s, "
            f"total {r['total_s']:.1f}s, peak RSS {r['peak_rss_gib']:.2f} GiB ({r['tokens']} tokens)"
        )
    print(
        f"layer-wise / whole-model: calibrate {lw['calibrate_s'] / whole['calibrate_s']:.3f}x, "
        f"total {lw['total_s'] / whole['total_s']:.3f}x (target <= 1.3x)"
    )


def bench_large(args) -> None:
    with tempfile.TemporaryDirectory(prefix="qpass-bench-large-", dir=args.dir) as tmp:
        path, out = Path(tmp) / "llama", Path(tmp) / "out"
        start = time.perf_counter()
        size = write_random_llama(path, args.layers, 5120, 40, 8, 13824)
        print(
            f"wrote {args.layers} layers, {size / 1e9:.1f} GB bf16 ({size / 2**30:.1f} GiB) in "
            f"{time.perf_counter() - start:.0f}s; memory {common.physical_memory_gib():.1f} GiB",
            flush=True,
        )
        start = time.perf_counter()
        flags = ["--kv-int8"] + (
            ["--w8a8", "--anti-method", "m1", "--format", "mindie"] if args.config == "w8a8-mindie" else []
        )
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "qpass.cli",
                "compile",
                str(path),
                *flags,
                "--calib-samples",
                str(args.windows),
                "--window",
                str(args.window),
                "-o",
                str(out),
            ],
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - start
        rss = common.peak_rss_gib(children=True)
        notes = [line for line in done.stderr.splitlines() if "--layerwise" in line]
        if done.returncode:
            raise SystemExit(f"qpass compile failed ({done.returncode}):\n{done.stderr[-3000:]}")
        report = json.loads((out / "report.json").read_text())
        written = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
        print(
            f"qpass compile {' '.join(flags)}: {seconds:.0f}s ({seconds / args.layers:.1f}s/layer, {args.windows} x "
            f"{args.window} tokens), peak RSS {rss:.2f} GiB, layer-wise: {report['model'].get('layerwise')}, "
            f"written: {len(list(out.iterdir()))} files, {written / 1e9:.1f} GB"
        )
        print(f"timings: {report['timings_s']}")
        print(f"qpass said: {' / '.join(notes) or '(nothing)'}")


def bench_auto(args) -> None:
    with tempfile.TemporaryDirectory(prefix="qpass-bench-auto-") as tmp:
        model = Path(tmp) / "smollm2"
        common.save_hf(qpass.load_model("default"), model)
        flags = [
            "--w8a8",
            "--fa-quant",
            "--kv-int8",
            "--disable-level",
            "auto",
            "--max-ppl-increase",
            "2",
            "--anti-method",
            "m3",
            "--act-method",
            "3",
            "--calib-samples",
            str(args.calib_samples),
            "--eval",
            args.eval,
            "--eval-windows",
            str(args.eval_windows),
        ]
        for mode, extra in (("whole", []), ("layerwise", ["--layerwise"])):
            if mode not in args.modes:
                continue
            out = Path(tmp) / mode
            run, report = common.compile_child(model, out, flags + extra)
            w, ev = report["w8a8"], report["eval"]
            search = report["w8a8"]["fallback_search"]
            rankings = sorted({step["ranking"] for step in search[1:] if step["ranking"] != "none"})
            print(
                f"{mode:>9}: {len(w['float_linears'])} of {w['linears']} Linears float "
                f"(rankings {', '.join(rankings)}; "
                f"{len(search) - 1} trials), eval ppl float {ev['ppl_float']:.4f}, quantized {ev['ppl_quant']:.4f} "
                f"({ev['ppl_increase_pct']:+.2f}%), {run['seconds']:.0f}s "
                f"(calibrate {report['timings_s']['calibrate']:.0f}s), "
                f"peak RSS {run['peak_rss_gib']:.2f} GiB",
                flush=True,
            )
            for step in search[1:]:
                print(
                    f"    {step['ranking']:5} {step['float_linears']:3} float: "
                    f"held-out divergence {step['ppl_increase_pct']:+.3f}% (95% bound {step['upper_95_pct']:+.3f}%)",
                    flush=True,
                )
            shutil.rmtree(out)


def write_random_onnx(path: Path, layers: int, *width) -> int:
    """:func:`write_random_llama` into ``path / "hf"``, then onnxruntime-genai's builder (``-p fp32 -e cpu``, offline)
    into ``path / "onnx"``, the Hugging Face directory deleted; the ONNX weights' bytes."""
    hf, onnx_dir = path / "hf", path / "onnx"
    write_random_llama(hf, layers, *width)
    common.genai_builder(hf, onnx_dir, path / "cache")
    shutil.rmtree(hf)
    shutil.rmtree(path / "cache", ignore_errors=True)
    return sum(f.stat().st_size for f in onnx_dir.iterdir() if f.name.startswith("model.onnx"))


def bench_onnx(args) -> None:
    import hashlib

    def sha(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    for form, flags in (("dynamo20", ["--kv-int8", "--fa-quant"]), ("genai", ["--kv-int8"])):
        model = Path(args.work) / form
        if not (model / "model.onnx").is_file():
            raise SystemExit(
                f"{model}: no model.onnx; run `python -m tools.bench_onnx prepare --work {args.work}` first"
            )
        flags = flags + [
            "--calib-samples",
            str(args.calib_samples),
            "--eval",
            args.eval,
            "--eval-windows",
            str(args.eval_windows),
        ]
        with tempfile.TemporaryDirectory(prefix="qpass-bench-onnx-") as tmp:
            outs = {}
            for mode, extra in (("whole", []), ("layerwise", ["--layerwise"])):
                outs[mode] = Path(tmp) / mode
                run, report = common.compile_child(model, outs[mode], flags + extra)
                ev, t = report["eval"], report["timings_s"]
                print(
                    f"{form} {' '.join(flags[: 2 if form == 'dynamo20' else 1])} {mode:>9}: {run['seconds']:.1f}s "
                    f"(calibrate {t['calibrate']:.1f}s, eval {t['eval']:.1f}s), "
                    f"peak RSS {run['peak_rss_gib']:.2f} GiB, "
                    f"ppl float {ev['ppl_float']:.4f} quantized {ev['ppl_quant']:.4f} "
                    f"({ev['ppl_increase_pct']:+.3f}%)",
                    flush=True,
                )
            same = {
                name: sha(outs["whole"] / name) == sha(outs["layerwise"] / name)
                for name in ("model.onnx", "recipe/recipe.safetensors")
            }
            print(f"{form}: the same bytes layer-wise and whole: {same}", flush=True)


def bench_onnx_rss(args) -> None:
    results = {}
    with tempfile.TemporaryDirectory(prefix="qpass-bench-onnx-rss-") as tmp:
        for layers in args.layers:
            path = Path(tmp) / f"llama-{layers}"
            size = write_random_onnx(path, layers)
            flags = ["--kv-int8", "--calib-samples", str(args.windows), "--window", str(args.window)]
            for mode in args.modes:
                run, report = common.compile_child(
                    path / "onnx", path / mode, flags + (["--layerwise"] if mode == "layerwise" else [])
                )
                results[layers, mode] = run["peak_rss_gib"]
                print(
                    f"{layers:3d} layers ({size / 2**30:.2f} GiB fp32 ONNX) {mode:>9}: "
                    f"peak RSS {run['peak_rss_gib']:.3f} GiB, "
                    f"{run['seconds']:.1f}s (calibrate {report['timings_s']['calibrate']:.1f}s, "
                    f"{report['timings_s']['calibrate'] / layers:.2f}s/layer)",
                    flush=True,
                )
                shutil.rmtree(path / mode)
            shutil.rmtree(path)
    low, high = min(args.layers), max(args.layers)
    for mode in args.modes:
        print(
            f"{mode}: RSS({high} layers) / RSS({low} layers) = {results[high, mode] / results[low, mode]:.3f}"
            + (" (target <= 1.3)" if mode == "layerwise" else "")
        )


def bench_onnx_large(args) -> None:
    with tempfile.TemporaryDirectory(prefix="qpass-bench-onnx-large-", dir=args.dir) as tmp:
        path = Path(tmp)
        start = time.perf_counter()
        size = write_random_onnx(path, args.layers, 5120, 40, 8, 13824)
        print(
            f"wrote {args.layers} layers as ONNX, {size / 1e9:.1f} GB fp32 ({size / 2**30:.1f} GiB) in "
            f"{time.perf_counter() - start:.0f}s; memory {common.physical_memory_gib():.1f} GiB",
            flush=True,
        )
        flags = ["--kv-int8", "--calib-samples", str(args.windows), "--window", str(args.window)]
        run, report = common.compile_child(path / "onnx", path / "out", flags)
        written = sum(f.stat().st_size for f in (path / "out").iterdir() if f.is_file())
        print(
            f"qpass compile --kv-int8: {run['seconds']:.0f}s "
            f"({run['seconds'] / args.layers:.1f}s/layer, {args.windows} x "
            f"{args.window} tokens), peak RSS {run['peak_rss_gib']:.2f} GiB, layer-wise: "
            f"{report['calibration'].get('layerwise')}, written {written / 1e9:.1f} GB"
        )
        print(f"timings: {report['timings_s']}")
        print(f"qpass said: {' / '.join(run['notes']) or '(nothing)'}")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
        return
    parser = common.parser(__doc__, __spec__.name)
    sub = parser.add_subparsers(dest="what", required=True)
    rss = sub.add_parser("rss", help="peak RSS of layer-wise C8 calibration against depth (random bf16 Llamas)")
    rss.add_argument("--layers", type=int, nargs="+", default=[4, 32])
    rss.add_argument("--windows", type=int, default=8)
    rss.add_argument("--window", type=int, default=256)
    rss.add_argument(
        "--config",
        choices=("kv", "w8a8", "w8a8-mindie"),
        default="kv",
        help="kv: C8 (default); w8a8: W8A8 + C8 with m1 smoothing; w8a8-mindie: the same, then its MindIE "
        "directory written layer by layer",
    )
    timing = sub.add_parser("time", help="layer-wise against whole-model calibration time on SmolLM2")
    timing.add_argument("--windows", type=int, default=32)
    timing.add_argument("--window", type=int, default=512)
    large = sub.add_parser("large", help="a ~30 GB random Llama through qpass compile --kv-int8 (layer-wise by itself)")
    large.add_argument("--layers", type=int, default=54)
    large.add_argument("--windows", type=int, default=2)
    large.add_argument("--window", type=int, default=512)
    large.add_argument("--dir", default=None, help="where to write the model (default: the temporary directory)")
    large.add_argument(
        "--config",
        choices=("kv", "w8a8-mindie"),
        default="kv",
        help="kv: --kv-int8 (default); w8a8-mindie: --w8a8 --kv-int8 --anti-method m1 --format mindie",
    )
    auto = sub.add_parser("auto", help="--disable-level auto whole-model and layer-wise on SmolLM2, with --eval")
    auto.add_argument("--eval", default="out/corpus/eval_prose.txt")
    auto.add_argument("--eval-windows", type=int, default=16)
    auto.add_argument("--calib-samples", type=int, default=14)
    auto.add_argument("--modes", nargs="+", choices=("whole", "layerwise"), default=["whole", "layerwise"])
    onnx_bench = sub.add_parser("onnx", help="SmolLM2's ONNX exports whole and --layerwise, with --eval")
    onnx_bench.add_argument("--work", default="out/onnx-bench")
    onnx_bench.add_argument("--eval", default="out/corpus/eval_prose.txt")
    onnx_bench.add_argument("--eval-windows", type=int, default=16)
    onnx_bench.add_argument("--calib-samples", type=int, default=32)
    onnx_rss = sub.add_parser(
        "onnx-rss", help="peak RSS of ONNX C8 compiles against depth (builder models of the rss Llamas)"
    )
    onnx_rss.add_argument("--layers", type=int, nargs="+", default=[4, 32])
    onnx_rss.add_argument("--windows", type=int, default=8)
    onnx_rss.add_argument("--window", type=int, default=256)
    onnx_rss.add_argument("--modes", nargs="+", choices=("whole", "layerwise"), default=["layerwise", "whole"])
    onnx_large = sub.add_parser("onnx-large", help="an ONNX model larger than memory through qpass compile --kv-int8")
    onnx_large.add_argument("--layers", type=int, default=24)
    onnx_large.add_argument("--windows", type=int, default=2)
    onnx_large.add_argument("--window", type=int, default=512)
    onnx_large.add_argument("--dir", default=None, help="where to write the model (default: the temporary directory)")
    args = parser.parse_args()
    {
        "rss": bench_rss,
        "time": bench_time,
        "large": bench_large,
        "auto": bench_auto,
        "onnx": bench_onnx,
        "onnx-rss": bench_onnx_rss,
        "onnx-large": bench_onnx_large,
    }[args.what](args)


if __name__ == "__main__":
    main()
