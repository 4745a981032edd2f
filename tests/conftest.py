"""Shared fixtures: SmolLM2's tokenizer, a tiny Llama saved as a Hugging Face directory, real text, and the ONNX
exports of tests/helpers (onnxruntime-genai's builder output, the ONNX passes' tiny Llama)."""

import pytest
import torch

from qpass.core import corpus

# the helpers' session fixtures, for every test module: the ONNX exports, onnxruntime-genai's builder output
pytest_plugins = ["tests.helpers.onnx_cases", "tests.helpers.onnx_genai_cases", "tests.helpers.onnx_tiny"]


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from qpass.models.loaders import default_gguf_path

    path = default_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A 2-layer random Llama (GQA 4/2 heads, head_dim 16) with SmolLM2's vocabulary and tokenizer."""
    from qpass.models.tiny import tiny_model

    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer))
    model.save_pretrained(path, safe_serialization=True)
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_head64_dir(tmp_path_factory, smollm2_tokenizer):
    """A 2-layer random Llama that qpass's paged ops and vLLM both run (head_dim 64, 4 heads over 2 KV heads), with
    1024 positions (a window of 512 and its next token fit vLLM's max_model_len)."""
    from qpass.models.tiny import tiny_model

    path = tmp_path_factory.mktemp("tiny-head64")
    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer), hidden_size=256)
    model.config.max_position_embeddings = 1024
    model.save_pretrained(path, safe_serialization=True)
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_files(tmp_path_factory):
    """Calibration jsonl and evaluation texts from the standard-library corpus (disjoint modules)."""
    return corpus.write(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
