"""--format vllm-ascend: what we write loads the way vllm-ascend loads it (tests/vllm_ascend_loader.py), and
what it cannot run is refused. The same calibration feeds --format mindie."""

import json

import pytest
import torch

from qpass.core.errors import QpassError
from qpass.core.evaluate import perplexity
from qpass.exporters.mindie_load import load as load_mindie
from qpass.exporters.mindie_write import export_mindie, fused_floats
from qpass.models.tiny import tiny_config
from tests.helpers.frontend_cases import calibrated, frontend
from tests.helpers.mixed_w8a8 import splice_static_linear, with_dynamic_linears
from tests.helpers.vllm_ascend_loader import LoaderError
from tests.helpers.vllm_ascend_loader import load as vllm_ascend_load

WINDOW = 32


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama():
    """A tied-embedding tiny Llama (like SmolLM2) with head_dim 64, calibrated W8A8 + symmetric C8."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", hidden_size=256)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 256, (6, WINDOW), generator=torch.Generator().manual_seed(2))
    _, recipe = calibrated(model, ids, kv_cache="static", symmetric=True, w8a8=True)
    return model, recipe, ids


def _export(model, recipe, out, target, dtype=torch.float16):
    config = {**model.config.to_dict(), "architectures": ["LlamaForCausalLM"]}
    export_mindie(config, model.state_dict(), recipe, None, out, dtype, target)
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_what_we_write_is_what_vllm_ascend_loads(llama, tmp_path, dtype):
    model, recipe, _ = llama
    if dtype == torch.bfloat16:  # C8 is documented for float16; vllm-ascend takes W8A8 in bfloat16
        recipe = recipe.replace(
            config=type(recipe.config)(w8a8=True),
            tensors={k: v for k, v in recipe.tensors.items() if not k.startswith("layers.")},
        )
    out = _export(model, recipe, tmp_path / "v", "vllm-ascend", dtype)
    config = json.loads((out / "config.json").read_text())
    description = json.loads((out / "quant_model_description.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert description["lm_head.weight"] == "FLOAT" and "fa_quant_type" not in description
    params = vllm_ascend_load(out)  # raises where vllm-ascend would; consumes every tensor
    assert params["model.layers.0.self_attn.qkv_proj.weight"].dtype == torch.int8
    assert params["model.layers.1.mlp.gate_up_proj.deq_scale"].dtype == (
        torch.int64 if dtype == torch.float16 else torch.float32
    )
    if dtype == torch.float16:
        assert (
            description["kv_cache_type"] == "C8"
            and description["model.layers.0.self_attn.k_proj.kv_cache_scale"] == "C8"
        )
        assert params["model.layers.1.self_attn.attn.v_cache_scale"].shape == (2 * 64,)
        assert not params["model.layers.1.self_attn.attn.k_cache_offset"].any()


def test_the_mindie_form_does_not_load_in_vllm_ascend(llama, tmp_path):
    model, recipe, _ = llama
    out = _export(model, recipe, tmp_path / "m", "mindie")
    assert json.loads((out / "config.json").read_text())["quantization_config"] == {"kv_quant_type": "C8"}
    with pytest.raises(LoaderError, match="KeyError"):  # vLLM takes quantization_config as the whole description
        vllm_ascend_load(out)


def test_both_targets_run_the_same_numbers_in_our_reader(llama, tmp_path):
    model, recipe, ids = llama
    ppl = {}
    for target in ("mindie", "vllm-ascend"):
        loaded = load_mindie(_export(model, recipe, tmp_path / target, target), load_tokenizer=False)
        ppl[target] = perplexity(frontend(loaded.model, WINDOW).logits(loaded.recipe), ids[:2], 2)
    assert ppl["mindie"] == ppl["vllm-ascend"]


def test_what_vllm_ascend_cannot_run_is_refused(llama, tmp_path):
    model, recipe, ids = llama
    asym = calibrated(model, ids, kv_cache="static", w8a8=True)[1]
    with pytest.raises(QpassError, match="C8 must be symmetric; add --symmetric"):
        _export(model, asym, tmp_path / "a", "vllm-ascend")
    fa = calibrated(model, ids, fa_quant=True, w8a8=True)[1]
    with pytest.raises(QpassError, match="FAKQuant"):
        _export(model, fa, tmp_path / "f", "vllm-ascend")
    assert not (tmp_path / "a").exists() and not (tmp_path / "f").exists()


@pytest.mark.parametrize("target", ["vllm-ascend", "mindie"])
def test_a_float_linear_takes_its_fused_siblings_with_it(llama, tmp_path, target, monkeypatch):
    """vllm-ascend and MindIE-LLM's runtime both refuse a merged gate/up of FLOAT and W8A8 shards: both targets write
    the group float, and what an older qpass wrote for MindIE (the mix) is refused by vllm-ascend's loader."""
    model, recipe, _ = llama
    up, gate = "model.layers.0.mlp.up_proj", "model.layers.0.mlp.gate_proj"
    kept = recipe.replace(w8a8={**recipe.w8a8, "float_linears": {up: "test"}})
    assert fused_floats(kept) == [gate]
    out = _export(model, kept, tmp_path / "v", target)
    description = json.loads((out / "quant_model_description.json").read_text())
    assert description[f"{up}.weight"] == description[f"{gate}.weight"] == "FLOAT"
    assert description["model.layers.1.mlp.gate_proj.weight"] == "W8A8"  # the other layer's group is untouched
    if target == "vllm-ascend":
        vllm_ascend_load(out)
        return
    assert load_mindie(out, load_tokenizer=False).info["w8a8_linears"] == 14 - 2
    monkeypatch.setattr("qpass.exporters.mindie_write.fused_floats", lambda recipe: [])
    mixed = _export(model, kept, tmp_path / "m", "mindie")  # the older form, made otherwise loadable below
    config = json.loads((mixed / "config.json").read_text())
    config.pop("quantization_config")
    (mixed / "config.json").write_text(json.dumps(config))
    description = json.loads((mixed / "quant_model_description.json").read_text())
    assert description[f"{gate}.weight"] == "W8A8"
    (mixed / "quant_model_description.json").write_text(json.dumps({**description, "lm_head.weight": "FLOAT"}))
    with pytest.raises(LoaderError, match="fuses shards"):
        vllm_ascend_load(mixed)


def test_static_and_per_token_linears_load_each_by_its_type(llama, tmp_path):
    """Static W8A8 + C8 with per-token Linears (whole fused groups): vllm-ascend builds each fused layer with its
    shards' one type (W8A8_DYNAMIC: weight, weight_scale, weight_offset; no activation qparams), and both targets run
    the same numbers in our reader, with each Linear in its form."""
    model, recipe, ids = llama
    mixed = with_dynamic_linears(recipe)
    out = _export(model, mixed, tmp_path / "v", "vllm-ascend")
    description = json.loads((out / "quant_model_description.json").read_text())
    assert description["model_quant_type"] == "W8A8" and description["kv_cache_type"] == "C8"
    params = vllm_ascend_load(out)
    dynamic, static = "model.layers.0.self_attn.qkv_proj", "model.layers.1.self_attn.qkv_proj"
    assert params[f"{dynamic}.weight"].dtype == params[f"{static}.weight"].dtype == torch.int8
    assert {f"{dynamic}.weight_scale", f"{dynamic}.weight_offset"} <= set(params)
    assert not any(k.startswith((f"{dynamic}.input", f"{dynamic}.deq", f"{dynamic}.quant")) for k in params)
    assert {f"{static}.input_scale", f"{static}.deq_scale", "model.layers.1.mlp.gate_up_proj.weight_offset"} <= set(
        params
    )
    assert "model.layers.1.mlp.gate_up_proj.input_scale" not in params  # gate/up of layer 1: per token
    ppl = {}
    for target in ("mindie", "vllm-ascend"):
        loaded = load_mindie(_export(model, mixed, tmp_path / target, target), load_tokenizer=False)
        assert loaded.info["w8a8_linears"] == 14
        ppl[target] = perplexity(frontend(loaded.model, WINDOW).logits(loaded.recipe), ids[:2], 2)
    assert ppl["mindie"] == ppl["vllm-ascend"]


def test_vllm_ascend_refuses_a_fused_layer_of_two_types(llama, tmp_path):
    """Our writer refuses to write it; spliced by hand, vllm-ascend's loader refuses it too (one type per packed
    layer), and so does our reader."""
    model, recipe, _ = llama
    split = with_dynamic_linears(recipe, ["model.layers.0.mlp.up_proj"])
    with pytest.raises(QpassError, match="gate_proj, model.layers.0.mlp.up_proj as one fused layer"):
        _export(model, split, tmp_path / "split", "vllm-ascend")
    static = _export(model, recipe, tmp_path / "static", "vllm-ascend")
    mixed = _export(model, with_dynamic_linears(recipe), tmp_path / "mixed", "vllm-ascend")
    splice_static_linear(mixed, static, "model.layers.1.mlp.gate_proj")  # W8A8 beside layer 1's W8A8_DYNAMIC up_proj
    with pytest.raises(LoaderError, match=r"fuses shards of types \['W8A8', 'W8A8_DYNAMIC'\]"):
        vllm_ascend_load(mixed)
    with pytest.raises(QpassError, match="type the fused Linears alike"):
        load_mindie(mixed, load_tokenizer=False)


def test_cli_writes_vllm_ascend_from_one_calibration(tiny_model_dir, text_files, tmp_path, capsys):
    from qpass.cli import main

    small = ["--window", "64", "--calib-samples", "4", "--batch-size", "2"]
    vllm = tmp_path / "vllm"
    assert (
        main(
            [
                "compile",
                str(tiny_model_dir),
                "--w8a8",
                "--kv-int8",
                "--symmetric",
                "--calib",
                str(text_files["calib"]),
                "--format",
                "vllm-ascend",
                "-o",
                str(vllm),
                *small,
            ]
        )
        == 0
    )
    params = vllm_ascend_load(vllm)
    assert "model.layers.1.self_attn.attn.k_cache_scale" in params
    report = json.loads((vllm / "report.json").read_text())
    assert report["export"] == {"format": "vllm-ascend", "dtype": "float16", "float_for_fusion": []}
    # the same recipe, written for MindIE
    mindie = tmp_path / "mindie"
    recipe_dir = tmp_path / "qpass"
    assert (
        main(
            [
                "compile",
                str(tiny_model_dir),
                "--w8a8",
                "--kv-int8",
                "--symmetric",
                "--calib",
                str(text_files["calib"]),
                "-o",
                str(recipe_dir),
                *small,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "compile",
                str(tiny_model_dir),
                "--recipe",
                str(recipe_dir / "recipe"),
                "--format",
                "mindie",
                "-o",
                str(mindie),
            ]
        )
        == 0
    )
    capsys.readouterr()
    results = []
    for d in (vllm, mindie):
        assert main(["eval", str(d), "--eval", str(text_files["prose"]), "--eval-windows", "2", "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out)["ppl_quant"])
    assert results[0] == pytest.approx(results[1], rel=1e-6)
