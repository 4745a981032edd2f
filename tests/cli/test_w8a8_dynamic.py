"""``--w8a8 dynamic`` (int8 weights per channel, activations int8 per token at run time): the option's forms and
refusals, older recipes' ``w8a8: true``, the integer op against float64, the pass, and each format's round trip
(compile, the reader, eval, run) with smoothing, C8, FAQuant, the dynamic cache and ``--layerwise``."""

import json

import pytest
import torch

from qpass.cli import build_parser, main
from qpass.core.config import QuantConfig
from qpass.core.errors import QpassError
from qpass.core.recipe import Recipe
from qpass.exporters import registry
from qpass.runtime.w8a8 import (
    W8A8DynamicLinear,
    int8_matmul,
    quantize_per_token,
    w8a8_dynamic_linear_reference,
    w8a8_dynamic_weights,
)
from tests.helpers.paged_cases import tiny

SMALL = ["--window", "64", "--calib-samples", "4", "--eval-windows", "4", "--batch-size", "2"]
REUSE_SMALL = ["--window", "64", "--eval-windows", "4", "--batch-size", "2"]  # --recipe reads no calibration windows
LINEARS = 14  # q, k, v, o, gate, up, down in each of the 2 decoder layers


@pytest.mark.parametrize(
    "argv, w8a8",
    [([], None), (["--w8a8"], "static"), (["--w8a8", "static"], "static"), (["--w8a8", "dynamic"], "dynamic")],
)
def test_w8a8_takes_an_optional_form(argv, w8a8):
    assert build_parser().parse_args(["compile", "MODEL", *argv, "-o", "out"]).w8a8 == w8a8


def test_config_refuses_what_dynamic_does_not_read():
    assert QuantConfig(w8a8=True).w8a8 == "static" and QuantConfig(fa_quant=True, w8a8=False).w8a8 is None
    with pytest.raises(ValueError, match="act_method=3 applies to static W8A8 .*drop --act-method"):
        QuantConfig(w8a8="dynamic", act_method=3)
    with pytest.raises(ValueError, match="disable_level='auto' with w8a8='dynamic'"):
        QuantConfig(w8a8="dynamic", disable_level="auto")
    with pytest.raises(ValueError, match="w8a8='per-token' is not supported"):
        QuantConfig(w8a8="per-token")


def test_act_method_with_dynamic_is_one_line_exit_2(tmp_path, capsys):
    argv = ["compile", str(tmp_path / "model"), "--w8a8", "dynamic", "--act-method", "3", "-o", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "drop --act-method" in err


def test_an_onnx_model_refuses_it():
    from qpass.frontends.onnx.pipeline import check_config

    with pytest.raises(QpassError, match="--w8a8: qpass quantizes the attention of ONNX models"):
        check_config(QuantConfig(w8a8="dynamic"), [])


def test_the_op_equals_float64_and_accumulates_exactly():
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 320), torch.randn(48)
    x = torch.randn(2, 7, 320) * torch.logspace(-3, 3, 7)[None, :, None]  # tokens 10^6 apart in scale
    x[0, 0] = 0.0  # an all-zero token
    w = w8a8_dynamic_weights(weight, bias)
    xq, scale = quantize_per_token(x.reshape(-1, 320))
    assert (xq.abs().amax(-1)[1:] == 127).all() and xq[0].abs().max() == 0  # each token's own max reaches 127
    exact = xq.long() @ w.weight.long().t()  # int64: the exact integer product
    assert torch.equal(int8_matmul(xq, w.weight).long(), exact)
    y = W8A8DynamicLinear(w)(x)
    ref = w8a8_dynamic_linear_reference(x.double(), w)
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(y[0, 0], bias)  # a zero token gives the bias
    rel = (y - (x @ weight.t() + bias)).norm(dim=-1) / (x @ weight.t()).norm(dim=-1)
    assert rel[:, 1:].max() < 0.02  # per-token: small tokens keep their precision


def test_an_older_recipe_with_w8a8_true_loads_as_static(tmp_path):
    from qpass.core.recipe import JSON_FILE, SiteGeometry

    recipe = Recipe(QuantConfig(w8a8="static"), [SiteGeometry(0, 4, 2, 16, "model.layers.0.self_attn")])
    recipe.save(tmp_path)
    doc = json.loads((tmp_path / JSON_FILE).read_text())
    assert doc["config"]["w8a8"] == "static"
    doc["config"]["w8a8"] = True  # as qpass wrote it before --w8a8 took a form
    (tmp_path / JSON_FILE).write_text(json.dumps(doc))
    assert Recipe.load(tmp_path).config.w8a8 == "static"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm2_tokenizer):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama-64")
    tiny("llama", vocab_size=len(smollm2_tokenizer)).save_pretrained(path, safe_serialization=True)
    smollm2_tokenizer.save_pretrained(path)
    return path


def _compile(model_dir, out, text_files, *options) -> None:
    argv = ["compile", str(model_dir), *options, "--calib", str(text_files["calib"])]
    assert main([*argv, "--eval", str(text_files["prose"]), "-o", str(out), *SMALL]) == 0


@pytest.fixture(scope="module")
def compiled(model_dir, tmp_path_factory, text_files):
    """``--w8a8 dynamic --anti-method m3 --kv-int8 --symmetric`` of the tiny Llama, in qpass's format."""
    out = tmp_path_factory.mktemp("w8a8-dynamic") / "out"
    _compile(model_dir, out, text_files, "--w8a8", "dynamic", "--anti-method", "m3", "--kv-int8", "--symmetric")
    return out


def test_the_recipe_has_no_activation_ranges_and_the_program_is_integer(compiled):
    recipe = Recipe.load(compiled / "recipe")
    assert recipe.config == QuantConfig(w8a8="dynamic", anti_method="m3", kv_cache="static", symmetric=True)
    assert not any(k.startswith("w8a8.") for k in recipe.tensors)  # nothing calibrated for the Linears
    assert any(k.startswith("smooth.") for k in recipe.tensors)  # but smoothing is
    assert len(recipe.w8a8_linears()) == LINEARS
    report = json.loads((compiled / "report.json").read_text())
    assert report["passes"]["InsertW8A8Pass"] == LINEARS and report["w8a8"]["activations"] == "dynamic"
    assert "W8A8 dynamic (activations per token)" in (compiled / "report.txt").read_text()
    assert abs(report["eval"]["ppl_increase_pct"]) < 5
    program = torch.export.load(str(compiled / "program.pt2"))
    ops = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.qpass.w8a8_dynamic_linear.default) == LINEARS
    assert torch.ops.qpass.w8a8_linear.default not in ops and torch.ops.aten.linear.default in ops  # lm_head


@pytest.mark.parametrize("fmt, dtype", [("mindie", "float16"), ("vllm-ascend", "float16"), ("vllm", "bfloat16")])
def test_each_format_writes_its_form_and_reads_it_back(compiled, model_dir, text_files, tmp_path, capsys, fmt, dtype):
    out = tmp_path / fmt
    argv = ["compile", str(model_dir), "--recipe", str(compiled / "recipe"), "--format", fmt, "--dtype", dtype]
    assert main([*argv, "--eval", str(text_files["prose"]), "-o", str(out), *REUSE_SMALL]) == 0
    if fmt == "vllm":
        qc = json.loads((out / "config.json").read_text())["quantization_config"]["linear"]
        acts = qc["config_groups"]["group_0"]["input_activations"]
        assert acts == {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    else:
        from safetensors import safe_open

        description = json.loads((out / "quant_model_description.json").read_text())
        assert description["model_quant_type"] == "W8A8_DYNAMIC"
        p = "model.layers.0.self_attn.q_proj"
        assert {description[f"{p}.{s}"] for s in ("weight", "weight_scale", "weight_offset")} == {"W8A8_DYNAMIC"}
        with safe_open(str(out / "quant_model_weight_w8a8.safetensors"), framework="pt") as f:
            names = set(f.keys())
            assert f.get_tensor(f"{p}.weight").dtype == torch.int8
            assert f.get_tensor(f"{p}.weight_scale").dtype == getattr(torch, dtype)
            assert f.get_tensor(f"{p}.weight_scale").shape == (256, 1)
            assert not (f.get_tensor(f"{p}.weight_offset") != 0).any()
        assert not any(n.endswith((".input_scale", ".deq_scale", ".quant_bias")) for n in names)
    loaded = registry.detect(out).load(out, "eval")
    modules = [m for m in loaded.model.modules() if isinstance(m, W8A8DynamicLinear)]
    assert len(modules) == LINEARS
    capsys.readouterr()
    assert main(["eval", str(out), "--eval", str(text_files["prose"]), "--eval-windows", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert abs(result["ppl_increase_pct"]) < 5
    assert main(["run", str(out), "--prompt", "Once upon a time", "--max-new-tokens", "4"]) == 0


def test_faquant_and_the_mindie_format(model_dir, text_files, tmp_path):
    out = tmp_path / "fa"
    _compile(model_dir, out, text_files, "--w8a8", "dynamic", "--fa-quant", "--kv-int8", "--format", "mindie")
    description = json.loads((out / "quant_model_description.json").read_text())
    assert description["model_quant_type"] == "W8A8_DYNAMIC" and description["fa_quant_type"] == "FAQuant"
    loaded = registry.detect(out).load(out, "eval")
    assert loaded.recipe.config.fa_quant and loaded.recipe.config.kv_cache == "static"


def test_the_dynamic_cache_layer_by_layer(model_dir, text_files, tmp_path):
    out = tmp_path / "lw"
    _compile(model_dir, out, text_files, "--w8a8", "dynamic", "--anti-method", "m1", "--kv-int8", "dynamic")
    whole = Recipe.load(out / "recipe")
    options = ("--w8a8", "dynamic", "--anti-method", "m1", "--kv-int8", "dynamic", "--layerwise")
    _compile(model_dir, tmp_path / "lw2", text_files, *options)
    layered = Recipe.load(tmp_path / "lw2" / "recipe")
    assert layered.w8a8_linears() == whole.w8a8_linears() and len(whole.w8a8_linears()) == LINEARS
    for name, tensor in whole.tensors.items():  # the smoothing scales: the same, layer by layer
        torch.testing.assert_close(layered.tensors[name], tensor)
    report = json.loads((tmp_path / "lw2" / "report.json").read_text())
    assert abs(report["eval"]["ppl_increase_pct"]) < 5


def test_the_mindie_reader_refuses_a_nonzero_weight_offset(compiled, model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "m"
    argv = ["compile", str(model_dir), "--recipe", str(compiled / "recipe"), "--format", "mindie", "-o", str(out)]
    assert main([*argv, "--window", "64"]) == 0
    path = out / "quant_model_weight_w8a8.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.0.mlp.up_proj.weight_offset"] += 1
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(QpassError, match="up_proj.weight_offset is not 0"):
        registry.detect(out).load(out, "eval")
