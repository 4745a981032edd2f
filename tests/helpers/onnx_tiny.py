"""The ONNX passes' test model: :func:`qpass.models.tiny.tiny_model`'s Llama (2 layers, 4 query / 2 KV heads,
head_dim 16, vocabulary 256) exported as a decoder with KV-cache I/O (:mod:`qpass.models.onnx_export`), its recipe
from the PyTorch path, and a plain ONNX Runtime run of it.

``tiny_onnx`` is a session fixture (import it into a test module): ``{opset: model.onnx}`` for opset 20
(MatMul-Softmax-MatMul attention) and 23 (the ONNX ``Attention`` op), about 6 s an export; pytest-xdist's workers
share one set through a file lock.
"""

import functools
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch

OPSETS = (20, 23)
LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2, 4, 2, 16, 256


def tiny_llama() -> torch.nn.Module:
    """The model the ONNX files are exported from (seed 0: the same weights at every call)."""
    from qpass.models.tiny import tiny_model

    return tiny_model("llama", num_layers=LAYERS)


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> dict[int, Path]:
    from filelock import FileLock

    from qpass.models.onnx_export import export_decoder
    from tests.helpers.onnx_cases import run_dir

    shared = run_dir(tmp_path_factory)
    with FileLock(str(shared / "tiny-onnx.lock")):
        done = shared / "tiny-onnx.json"
        if done.is_file():
            return {int(k): Path(v) for k, v in json.loads(done.read_text()).items()}
        model = tiny_llama()
        paths = {opset: export_decoder(model, shared / f"tiny-onnx-opset{opset}.onnx", opset=opset) for opset in OPSETS}
        done.write_text(json.dumps({str(k): str(v) for k, v in paths.items()}))
        return paths


@functools.cache
def tiny_recipe(**config):
    """The recipe of :func:`tiny_llama` calibrated by the PyTorch path (min-max) on 4 random windows of 32 tokens
    with ``QuantConfig(**config)``; the ONNX export's sites have the same layers and geometry."""
    from tests.helpers.frontend_cases import calibrated

    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(5))
    return calibrated(tiny_llama(), ids, observer="minmax", **config)[1]


def load(path: Path):
    """``(model, [(site, cache io)])`` of an ONNX decoder, as the ONNX frontend reads it."""
    from qpass.frontends.onnx.load import load_decoder

    return load_decoder(path)


def run(model: ir.Model, ids: np.ndarray, past: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Every output (``logits``, ``present.*``) of ``model`` in ONNX Runtime for token ids ``[B, S]`` after ``past``
    (``past_key_values.*``; empty, of the graph input's dtype, by default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    types = {"tensor(float)": np.float32, "tensor(int8)": np.int8}
    batch, seq = ids.shape
    start = 0 if past is None else next(iter(past.values())).shape[2]
    feeds = {
        "input_ids": ids.astype(np.int64),
        "attention_mask": np.ones((batch, start + seq), np.int64),
        "position_ids": np.broadcast_to(np.arange(start, start + seq), (batch, seq)).astype(np.int64),
    }
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = (
                past[i.name] if past is not None else np.zeros((batch, KV_HEADS, 0, HEAD_DIM), types[i.type])
            )
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def as_past(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A run's ``present.*`` as the next run's ``past_key_values.*``."""
    return {"past_key_values." + k.removeprefix("present."): v for k, v in outputs.items() if k.startswith("present.")}


def op_types(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]
