"""ONNX Runtime CPU speed of GroupQueryAttention's int8 KV cache against its float cache, on a random-weight
Llama built by onnxruntime-genai's model builder and rewritten by qpass (QuantizeGQAKVCachePass).

    python -m tools.bench_onnx_gqa                        # 2 layers, hidden 512, 8/2 heads, head_dim 64
    python -m tools.bench_onnx_gqa --context 1024 --threads 2 --repeats 7

Prints median seconds and int8/float ratios for prefill (``--context`` tokens from an empty cache) and for
decode (``--steps`` single tokens after a ``--context``-token cache, each present fed back as past), the two
models measured in alternating order in every repeat. Variants: ONNX Runtime's flash GQA path switched off
(``ORT_GQA_DISABLE_FLASH_ATTENTION=1``, read when a session is created), and "handover": prefill with the
float model and quantize its cache in NumPy the way the kernel does (``clip(rint(x * (1 / scale)))``), then
decode with the int8 model.
"""

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from tools import common


def build(work: Path, layers: int, hidden: int, heads: int, kv_heads: int, vocab: int, context: int) -> Path:
    """A random Llama HF directory and the builder's fp32 CPU model of it; the model directory."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=2 * context + 64,
        bos_token_id=0,
        eos_token_id=1,
    )
    hf = work / "hf"
    LlamaForCausalLM(config).eval().save_pretrained(hf, safe_serialization=True)
    vocab_map = {f"t{i}": i for i in range(vocab)}  # the builder saves a tokenizer; a word-level one suffices
    PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab_map, unk_token="t0")), bos_token="t0", eos_token="t1"
    ).save_pretrained(hf)
    return common.genai_builder(hf, work / "float", work / "cache")


def session(path: Path, threads: int, flash: bool = True):
    import onnxruntime as ort

    if flash:
        os.environ.pop("ORT_GQA_DISABLE_FLASH_ATTENTION", None)
    else:
        os.environ["ORT_GQA_DISABLE_FLASH_ATTENTION"] = "1"
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    finally:
        os.environ.pop("ORT_GQA_DISABLE_FLASH_ATTENTION", None)


def past_names(sess) -> list[str]:
    return [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")]


def empty(sess, head_dim: int) -> dict:
    types = {"tensor(float)": np.float32, "tensor(int8)": np.int8}
    return {
        i.name: np.zeros((1, i.shape[1], 0, head_dim), types[i.type])
        for i in sess.get_inputs()
        if i.name.startswith("past_key_values.")
    }


def step(sess, ids: np.ndarray, past: dict) -> dict:
    """Run ``ids [1, S]`` after ``past``; the presents, renamed as the next step's past."""
    names = past_names(sess)
    total = ids.shape[1] + past[names[0]].shape[2]
    outs = sess.run(
        [n.replace("past_key_values.", "present.") for n in names],
        {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64), **past},
    )
    return dict(zip(names, outs, strict=True))


def decode(sess, past: dict, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        past = step(sess, np.array([[5]], np.int64), past)
    return time.perf_counter() - start


def quantize_cache(past: dict, k_scales, v_scales) -> dict:
    """The float cache ``[1, H, S, D]`` as the int8 kernel writes it: ``clip(rint(x * (1 / scale)), -128, 127)``."""
    out = {}
    for name, x in past.items():
        layer = int(name.split(".")[1])
        scale = (k_scales if name.endswith(".key") else v_scales)[layer].reshape(1, x.shape[1], 1, x.shape[3])
        inv = (np.float32(1) / scale).astype(np.float32)
        out[name] = np.clip(np.rint(x * inv), -128, 127).astype(np.int8)
    return out


def main() -> None:
    parser = common.parser(__doc__, __spec__.name)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=16, help="decode steps per timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    args = parser.parse_args()

    import onnx_ir as ir

    # an internal: the GQA cache pass alone, on the builder's model with absmax scales of its own float cache
    from qpass.passes.onnx.quantize_gqa_kv_cache import GQAKVScales, QuantizeGQAKVCachePass

    head_dim = args.hidden // args.heads
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        float_dir = build(work, args.layers, args.hidden, args.heads, args.kv_heads, args.vocab, args.context)
        fp = session(float_dir / "model.onnx", args.threads)
        ids = np.random.default_rng(0).integers(2, args.vocab, (1, args.context)).astype(np.int64)
        float_past = step(fp, ids, empty(fp, head_dim))
        layers = range(args.layers)
        k_scales = [np.abs(float_past[f"past_key_values.{i}.key"]).max(axis=(0, 2)).reshape(-1) / 127 for i in layers]
        v_scales = [np.abs(float_past[f"past_key_values.{i}.value"]).max(axis=(0, 2)).reshape(-1) / 127 for i in layers]
        model = ir.load(float_dir / "model.onnx")
        QuantizeGQAKVCachePass([GQAKVScales(k, v) for k, v in zip(k_scales, v_scales, strict=True)])(model)
        ir.save(model, work / "int8.onnx", external_data="int8.onnx.data")

        sessions = {
            "float": fp,
            "int8": session(work / "int8.onnx", args.threads),
            "float noflash": session(float_dir / "model.onnx", args.threads, flash=False),
            "int8 noflash": session(work / "int8.onnx", args.threads, flash=False),
        }
        int8_past = quantize_cache(float_past, k_scales, v_scales)
        own = step(sessions["int8"], ids, empty(sessions["int8"], head_dim))
        same = ", ".join(f"{np.mean(own[n] == int8_past[n]):.2%}" for n in own)
        print(
            f"model: {args.layers} layers, hidden {args.hidden}, {args.heads}/{args.kv_heads} heads, head_dim "
            f"{head_dim}, vocab {args.vocab}; context {args.context}, {args.steps} decode steps, {args.threads} "
            f"thread(s), {args.repeats} alternating repeats"
        )
        print(
            f"handover cache equal to the int8 prefill's own cache, per cache input ({', '.join(own)}): {same} "
            "of the elements (layer 0 differs only at rounding ties; later layers see the float prefill's "
            "attention output, not the int8 one's)"
        )
        for name, sess in sessions.items():  # warm-up: first runs allocate and pack
            step(sess, ids, empty(sess, head_dim))
            decode(sess, int8_past if "int8" in name else float_past, 2)

        times = {}
        for r in range(args.repeats):
            order = list(sessions) if r % 2 == 0 else list(sessions)[::-1]
            for name in order:
                sess = sessions[name]
                start = time.perf_counter()
                step(sess, ids, empty(sess, head_dim))
                times.setdefault(("prefill", name), []).append(time.perf_counter() - start)
                past = int8_past if "int8" in name else float_past
                times.setdefault(("decode", name), []).append(decode(sess, past, args.steps) / args.steps)
            start = time.perf_counter()  # handover: float prefill, NumPy quantization of its cache
            handed = quantize_cache(step(fp, ids, empty(fp, head_dim)), k_scales, v_scales)
            times.setdefault(("prefill", "float + handover"), []).append(time.perf_counter() - start)
            assert all(v.dtype == np.int8 for v in handed.values())

        med = {key: statistics.median(values) for key, values in times.items()}
        print(f"{'':8} {'variant':18} {'median s':>10} {'vs float':>9}")
        for phase in ("prefill", "decode"):
            for (p, name), value in med.items():
                if p == phase:
                    base = med[(phase, "float noflash" if "noflash" in name else "float")]
                    print(f"{phase:8} {name:18} {value:10.4f} {value / base:8.2f}x")


if __name__ == "__main__":
    main()
