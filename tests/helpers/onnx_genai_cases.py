"""onnxruntime-genai models for tests: the model builder run offline on a tiny Hugging Face directory, ONNX
Runtime sessions over the result, and per-channel absmax scales of its KV cache.

``genai_float_dir`` is a session fixture (import it into a test module, beside conftest's ``tiny_model_dir``):
the builder's ``-p fp32 -e cpu`` output, built once per session. The builder runs in a subprocess with the
Hugging Face hub offline, and takes a second or two per layer of a tiny model.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def run_builder(hf_dir: Path, out_dir: Path, extra_options: dict[str, str] | None = None) -> Path:
    """``python -m onnxruntime_genai.models.builder -i hf_dir -o out_dir -p fp32 -e cpu`` offline; ``out_dir``."""
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(hf_dir),
        "-o",
        str(out_dir),
        "-p",
        "fp32",
        "-e",
        "cpu",
        "-c",
        str(Path(out_dir).parent / f"{Path(out_dir).name}-cache"),
    ]
    if extra_options:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra_options.items())]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not (Path(out_dir) / "model.onnx").is_file():
        raise RuntimeError(f"the onnxruntime-genai builder failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return Path(out_dir)


def run_builder_int8(hf_dir: Path, out_dir: Path, k_scales: list[np.ndarray], v_scales: list[np.ndarray]) -> Path:
    """The builder's own int8 per-channel KV-cache model, fed ``k_scales[layer]``/``v_scales[layer]``
    ``[kv_heads * head_dim]`` through its ``kv_cache_scale_file``."""
    scale_file = Path(out_dir).parent / f"{Path(out_dir).name}-scales.json"
    scale_file.write_text(
        json.dumps(
            {
                "scales": {
                    "k_scales": [np.asarray(s).tolist() for s in k_scales],
                    "v_scales": [np.asarray(s).tolist() for s in v_scales],
                }
            }
        )
    )
    return run_builder(
        hf_dir, out_dir, {"kv_cache_quant_scheme": "int8_per_channel", "kv_cache_scale_file": str(scale_file)}
    )


@pytest.fixture(scope="session")
def genai_float_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The builder's fp32 CPU model of conftest's tiny Llama (2 layers, GQA 4/2 heads, head_dim 16):
    ``model.onnx`` (+ ``.data``), ``genai_config.json`` and the tokenizer."""
    return run_builder(tiny_model_dir, tmp_path_factory.mktemp("genai") / "float")


def session(model_path: Path):
    """A 1-thread CPU InferenceSession (the machine's cores are shared; timings are not measured here)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def cache_io(sess) -> tuple[list[str], list[str]]:
    """The session's cache input names and, in the same order, the present output names
    (``past_key_values.*`` -> ``present.*``, the builder's naming)."""
    past = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    return past, [name.replace("past_key_values.", "present.") for name in past]


def empty_cache(sess, head_dim: int, batch: int = 1) -> dict[str, np.ndarray]:
    """Zero-length past caches ``[batch, kv_heads, 0, head_dim]`` in each cache input's element type."""
    types = {"tensor(float)": np.float32, "tensor(int8)": np.int8}
    return {
        i.name: np.zeros((batch, i.shape[1], 0, head_dim), types[i.type])
        for i in sess.get_inputs()
        if i.name.startswith("past_key_values.")
    }


def forward(
    sess, ids: np.ndarray, past: dict[str, np.ndarray], mask: np.ndarray | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One step: logits ``[B, S, vocab]`` of ``ids [B, S]`` after ``past``, and the next step's past (the
    present outputs, fed back unchanged). ``mask``: the attention mask ``[B, past + S]`` (default all ones)."""
    past_names, present_names = cache_io(sess)
    if mask is None:
        mask = np.ones((ids.shape[0], ids.shape[1] + next(iter(past.values())).shape[2]), np.int64)
    feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask, **past}
    outs = sess.run(["logits", *present_names], feeds)
    return outs[0], dict(zip(past_names, outs[1:], strict=True))


def greedy(sess, prompt: np.ndarray, steps: int, head_dim: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decode ``steps`` tokens after ``prompt [1, S]``: the tokens and each step's last logits."""
    logits, past = forward(sess, prompt, empty_cache(sess, head_dim))
    tokens, all_logits = [], [logits[0, -1]]
    for _ in range(steps):
        tokens.append(int(all_logits[-1].argmax()))
        logits, past = forward(sess, np.array([[tokens[-1]]]), past)
        all_logits.append(logits[0, -1])
    return tokens, all_logits[:-1]


def absmax_scales(sess, ids: np.ndarray, head_dim: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Symmetric per-channel int8 scales (absmax / 127) of every layer's present K and V over ``ids [B, S]``
    in one prefill of a float-cache session: per layer ``[kv_heads * head_dim]``, channel ``h * head_dim + d``."""
    _, past = forward(sess, ids, empty_cache(sess, head_dim, ids.shape[0]))
    names, _ = cache_io(sess)
    layers = sorted({int(n.split(".")[1]) for n in names})

    def scale(x):  # [B, H, S, D] -> [H * D]
        return (np.abs(x).max(axis=(0, 2)).reshape(-1) / 127.0).astype(np.float32)

    return (
        [scale(past[f"past_key_values.{i}.key"]) for i in layers],
        [scale(past[f"past_key_values.{i}.value"]) for i in layers],
    )
