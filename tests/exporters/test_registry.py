"""Each exporter owns its rules: one refusal per rule, asked by the CLI (before any work), the API's ``save`` and the
writer itself, in the same words."""

import pytest

from qpass.cli import main
from qpass.core.config import QuantConfig
from qpass.core.errors import QpassError
from qpass.exporters import NAMES, registry

TORCH, ONNX = {"frontend": "torch.export"}, {"frontend": "onnx"}
RULES = [  # (format, policy, options, words of the refusal); None: written
    ("qpass", dict(kv_cache="dynamic"), TORCH, None),
    ("qpass", dict(kv_cache="static"), ONNX, "an ONNX input is written as ONNX"),
    ("qpass", dict(kv_cache="static"), {**TORCH, "dtype": "float16"}, "only --format mindie / vllm-ascend"),
    ("onnx", dict(fa_quant=True), ONNX, None),
    ("onnx", dict(kv_cache="dynamic"), ONNX, "no per-token int8 cache form in ONNX"),
    ("onnx", dict(kv_cache="static"), TORCH, "export the model to ONNX"),
    ("mindie", dict(w8a8=True, fa_quant=True, kv_cache="static"), TORCH, None),
    ("mindie", dict(kv_cache="static"), TORCH, "the MindIE format is W8A8"),
    ("mindie", dict(w8a8=True, kv_cache="dynamic"), TORCH, "holds only a static int8 KV cache"),
    ("mindie", dict(w8a8=True, kv_cache="static"), {**TORCH, "dtype": "bfloat16"}, "documented for float16 weights"),
    ("mindie", dict(w8a8=True), {**TORCH, "dtype": "float32"}, "--dtype float32"),
    ("vllm-ascend", dict(w8a8=True, kv_cache="static", symmetric=True), TORCH, None),
    ("vllm-ascend", dict(w8a8=True, fa_quant=True), TORCH, "only as FAKQuant"),
    ("vllm-ascend", dict(w8a8=True, kv_cache="static"), TORCH, "C8 must be symmetric"),
    ("vllm", dict(fa_quant=True, kv_cache="static"), TORCH, None),
    ("vllm", dict(w8a8=True), {**TORCH, "dtype": "bfloat16"}, None),
    ("vllm", dict(kv_cache="static"), ONNX, "an ONNX input is written as ONNX"),
    ("vllm", dict(kv_cache="static"), {**TORCH, "dtype": "int8"}, "--dtype int8"),
    ("vllm", dict(kv_cache="dynamic"), TORCH, None),
]


@pytest.mark.parametrize("name, policy, options, words", RULES)
def test_each_exporter_says_what_it_cannot_write(name, policy, options, words):
    why = registry.get(name).refusal(QuantConfig(**policy), options)
    assert why is None if words is None else words in why, why
    if words is not None:
        with pytest.raises(QpassError, match=words.replace("(", r"\(").replace(")", r"\)")):
            registry.check(name, QuantConfig(**policy), options)


def test_every_exporter_has_rules():
    assert {name for name, *_ in RULES} == set(NAMES)


def test_the_cli_and_the_api_refuse_in_the_writers_words(tiny_model_dir, text_files, tmp_path, capsys):
    """--format vllm-ascend with --fa-quant: the CLI refuses before the model loads; a result compiled through the API
    is refused by ``save`` (and its writer) in the same words, and nothing is written."""
    import qpass

    args = [
        "compile",
        str(tiny_model_dir),
        "--w8a8",
        "--fa-quant",
        "--format",
        "vllm-ascend",
        "-o",
        str(tmp_path / "c"),
    ]
    assert main(args) == 2
    cli = capsys.readouterr().err.strip().removeprefix("qpass compile: error: ")
    result = qpass.compile(
        str(tiny_model_dir),
        QuantConfig(w8a8=True, fa_quant=True),
        calib=text_files["calib"],
        run=qpass.RunSettings(window=32, calib_samples=2),
    )
    with pytest.raises(QpassError) as api:
        result.save(tmp_path / "a", format="vllm-ascend")
    from qpass.exporters.mindie_write import write_vllm_ascend

    with pytest.raises(QpassError) as writer:
        write_vllm_ascend(result.compiled, tmp_path / "w", {})
    assert cli == str(api.value) == str(writer.value)
    assert not any(tmp_path.iterdir())
