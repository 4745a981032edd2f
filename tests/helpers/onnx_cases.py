"""ONNX decoders for tests: conftest's tiny Llama exported with ``torch.onnx.export(dynamo=True)`` and KV-cache I/O.

``onnx_dirs`` is a session fixture (import it into a test module): ``{opset: directory}`` with ``model.onnx`` and
the tokenizer, for opset 20 (MatMul-Softmax-MatMul attention) and 23 (the ONNX ``Attention`` op). An export
takes about 15 s, so pytest-xdist's workers share one set through a file lock.
"""

import json
import os
from pathlib import Path

import pytest
import torch

OPSETS = (20, 23)


def export_dir(model_dir: Path, out: Path, opset: int, external_data: bool = False) -> Path:
    """``model_dir`` (a Hugging Face directory) exported into ``out`` with its tokenizer; ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qpass.models.onnx_export import export_decoder

    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    export_decoder(model, out / "model.onnx", opset=opset, external_data=external_data)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def run_dir(tmp_path_factory) -> Path:
    """This test run's own directory, the same for all its pytest-xdist workers (their base directories' parent);
    without xdist the base directory itself, since its parent holds every run's."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def onnx_dirs(tmp_path_factory, tiny_model_dir) -> dict[int, Path]:
    from filelock import FileLock

    shared = run_dir(tmp_path_factory)
    with FileLock(str(shared / "onnx-exports.lock")):
        done = shared / "onnx-exports.json"
        if done.is_file():
            return {int(k): Path(v) for k, v in json.loads(done.read_text()).items()}
        dirs = {opset: export_dir(tiny_model_dir, shared / f"onnx-opset{opset}", opset) for opset in OPSETS}
        done.write_text(json.dumps({str(k): str(v) for k, v in dirs.items()}))
        return dirs
