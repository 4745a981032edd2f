"""Recipes: saved and loaded (safetensors + JSON), deterministic, refused when they do not fit."""

import dataclasses
import json

import pytest
import torch

from qpass.core.calibrate import calibrate
from qpass.core.config import QuantConfig, cli_options
from qpass.core.errors import QpassError
from qpass.core.recipe import JSON_FILE, TENSORS_FILE, Recipe, axes, geometry, linear_key
from qpass.models.tiny import tiny_model
from tests.helpers.frontend_cases import frontend


@pytest.fixture(scope="module")
def calibrated():
    ids = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(3))
    return frontend(tiny_model("llama"), 32), ids


def _recipe(calibrated, **kw):
    fe, ids = calibrated
    return calibrate(fe, ids, QuantConfig(fa_quant=True, kv_cache="static", **kw))


def test_round_trip(calibrated, tmp_path):
    recipe = _recipe(calibrated)
    recipe.save(tmp_path)
    loaded = Recipe.load(tmp_path)
    assert loaded.config == recipe.config and loaded.sites == recipe.sites and loaded.stats == recipe.stats
    assert loaded.tensors.keys() == recipe.tensors.keys()
    for name, tensor in recipe.tensors.items():
        assert torch.equal(loaded.tensors[name], tensor), name
    assert loaded.get(1, "fa_q")[0].shape == (4, 16) and loaded.get(1, "kv_v")[1].shape == (32,)


def test_a_recipe_written_before_the_run_settings_left_the_policy_loads(calibrated, tmp_path):
    """Older recipes named the static cache ``"int8"`` and kept window, batch size and calibration windows in the
    config: the same policy loads (``"static"``), and the window it was calibrated over is kept beside it."""
    _recipe(calibrated).save(tmp_path)
    doc = json.loads((tmp_path / JSON_FILE).read_text())
    doc["config"].update(kv_cache="int8", window=64, batch_size=2, calib_samples=8)
    assert "calibrated_with" not in doc["stats"]  # calibrate alone records no run settings
    (tmp_path / JSON_FILE).write_text(json.dumps(doc))
    loaded = Recipe.load(tmp_path)
    assert loaded.config == QuantConfig(fa_quant=True, kv_cache="static")
    assert loaded.stats["calibrated_with"] == {"window": 64}


def test_same_inputs_give_byte_identical_recipes(calibrated, tmp_path):
    _recipe(calibrated).save(tmp_path / "a")
    _recipe(calibrated).save(tmp_path / "b")
    for name in (JSON_FILE, TENSORS_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_recipe_for_another_model_is_refused(calibrated):
    recipe = _recipe(calibrated)
    other = frontend(tiny_model("gpt2"), 32)
    with pytest.raises(QpassError, match="another model"):
        recipe.check_matches(geometry(other.attention_sites()))
    renamed = [dataclasses.replace(s, prefix="other." + s.prefix) for s in recipe.sites]
    with pytest.raises(QpassError, match="another model"):
        recipe.check_matches(tuple(renamed))  # same geometry, other module names


def test_missing_or_corrupt_recipe_is_refused(calibrated, tmp_path):
    with pytest.raises(QpassError, match="needs recipe.json"):
        Recipe.load(tmp_path)
    _recipe(calibrated).save(tmp_path)
    doc = json.loads((tmp_path / JSON_FILE).read_text())
    doc["config"]["observer"] = "magic"
    (tmp_path / JSON_FILE).write_text(json.dumps(doc))
    with pytest.raises(QpassError, match="not a qpass recipe"):
        Recipe.load(tmp_path)


def test_a_setting_nothing_reads_is_refused_but_an_older_recipe_holding_one_loads():
    """--percentile without --observer percentile (and the like) is refused: it would be recorded as applied. A
    recipe.json written before recorded such settings (a W8A8-only policy with the observer default of its day): they
    load as the defaults, since nothing read them."""
    with pytest.raises(ValueError, match="percentile=99.0 applies to observer='percentile'"):
        QuantConfig(kv_cache="static", percentile=99.0)
    with pytest.raises(ValueError, match="observer='mse' chooses the calibrated attention scales"):
        QuantConfig(w8a8=True, observer="mse")
    old = {"w8a8": True, "observer": "mse", "percentile": 99.0, "alpha": 0.7, "anti_method": "m3"}
    assert QuantConfig.from_dict(old) == QuantConfig(w8a8=True, anti_method="m3")
    assert (
        QuantConfig.from_dict({"kv_cache": "static", "observer": "percentile", "percentile": 99.0}).percentile == 99.0
    )


def test_config_is_validated_on_construction():
    with pytest.raises(ValueError, match="nothing to quantize"):
        QuantConfig()
    with pytest.raises(ValueError, match="observer"):
        QuantConfig(fa_quant=True, observer="magic")
    with pytest.raises(ValueError, match="kv_cache"):
        QuantConfig(kv_cache="int4")


def test_recipe_is_frozen_and_records_the_axes_of_every_tensor(calibrated, tmp_path):
    recipe = _recipe(calibrated)
    with pytest.raises(TypeError):
        recipe.tensors["layers.0.fa_q.scale"] = torch.ones(1)
    with pytest.raises(AttributeError):
        recipe.config = None
    assert axes("layers.1.fa_q.scale") == ("heads", "head_dim") and axes("layers.0.kv_v.offset") == (
        "kv_heads * head_dim",
    )
    assert axes("w8a8.model.layers.0.mlp.up_proj.input_scale") == ("tensor",)
    recipe.save(tmp_path)
    doc = json.loads((tmp_path / JSON_FILE).read_text())
    assert set(doc["axes"]) == set(recipe.tensors)
    for name, tensor in recipe.tensors.items():  # the axes name as many dimensions as the tensor has
        assert len(doc["axes"][name]) == tensor.dim(), name
    assert doc["sites"][0]["prefix"] == "model.layers.0.self_attn"
    assert doc["sites"][0]["projections"][1] == "model.layers.0.self_attn.k_proj"


def test_the_cli_options_are_the_config_fields():
    names = [name for name, _, _ in cli_options()]
    assert names == list(QuantConfig.__dataclass_fields__)
    flags = {name: (flag, kwargs) for name, flag, kwargs in cli_options()}
    assert flags["kv_cache"][0] == "--kv-int8" and flags["kv_cache"][1]["const"] == "static"
    assert flags["act_method"][1]["choices"] == (1, 2, 3) and flags["act_method"][1]["default"] == 1
    assert flags["observer"][1]["default"] == QuantConfig.__dataclass_fields__["observer"].default


@pytest.mark.parametrize(
    "value, message", [(float("nan"), "NaN"), (0.0, "zero or negative"), (float("inf"), "infinite")]
)
def test_a_recipe_with_a_degenerate_scale_is_refused(calibrated, tmp_path, value, message):
    from safetensors.torch import load_file, save_file

    _recipe(calibrated).save(tmp_path)
    tensors = load_file(str(tmp_path / TENSORS_FILE))
    tensors["layers.1.kv_v.scale"][3] = value
    save_file(tensors, str(tmp_path / TENSORS_FILE))
    with pytest.raises(QpassError, match=f"layers.1.kv_v.scale has a scale that is {message}"):
        Recipe.load(tmp_path)


def test_an_offset_outside_int8_is_refused(calibrated):
    recipe = _recipe(calibrated)
    offsets = recipe.tensors["layers.0.fa_k.offset"].clone()
    offsets[0, 0] = 300.0
    with pytest.raises(QpassError, match="layers.0.fa_k.offset has an offset that is not a finite number in"):
        recipe.replace(tensors={**recipe.tensors, "layers.0.fa_k.offset": offsets})


def test_dynamic_linears_of_a_static_recipe_load_and_are_refused_where_they_cannot_be(tmp_path):
    """A static recipe's per-token Linears round-trip; one named both float and per-token, or in a dynamic recipe,
    is refused on load."""
    config = QuantConfig(w8a8="static", disable_level="auto")
    tensors = {linear_key("a", "scale"): torch.tensor([0.1]), linear_key("a", "offset"): torch.tensor([3.0])}
    recipe = Recipe(config, (), tensors, {}, {"float_linears": {"c": "why"}, "dynamic_linears": {"b": "why"}})
    assert recipe.w8a8_linears() == ["a", "b"]
    assert [recipe.activations(n) for n in "abcd"] == ["static", "dynamic", None, None]
    recipe.save(tmp_path / "r")
    loaded = Recipe.load(tmp_path / "r")
    assert loaded.dynamic_linears == {"b": "why"} and loaded.activations("b") == "dynamic"
    doc = json.loads((tmp_path / "r" / "recipe.json").read_text())
    doc["w8a8"]["float_linears"]["b"] = "why"
    (tmp_path / "r" / "recipe.json").write_text(json.dumps(doc))
    with pytest.raises(QpassError, match="b is both float and dynamic"):
        Recipe.load(tmp_path / "r")
