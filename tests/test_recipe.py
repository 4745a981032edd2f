"""Recipes: saved and loaded (safetensors + JSON), deterministic, refused when they do not fit."""

import json

import pytest
import torch

from qpass.api import param_names
from qpass.calibrate import calibrate, geometry
from qpass.capture import capture
from qpass.config import QuantConfig
from qpass.errors import QpassError
from qpass.models.tiny import tiny_model
from qpass.passes.find_attention_sites import find_attention_sites
from qpass.recipe import JSON_FILE, TENSORS_FILE, Recipe


@pytest.fixture(scope="module")
def calibrated():
    program = capture(tiny_model("llama"), 32)
    sites = find_attention_sites(program.graph, param_names(program))
    ids = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(3))
    return program, sites, ids


def _recipe(calibrated, **kw):
    program, sites, ids = calibrated
    return calibrate(program, sites, ids, QuantConfig(fa_quant=True, kv_cache="int8", window=32, **kw))


def test_round_trip(calibrated, tmp_path):
    recipe = _recipe(calibrated)
    recipe.save(tmp_path)
    loaded = Recipe.load(tmp_path)
    assert loaded.config == recipe.config and loaded.sites == recipe.sites and loaded.stats == recipe.stats
    assert loaded.tensors.keys() == recipe.tensors.keys()
    for name, tensor in recipe.tensors.items():
        assert torch.equal(loaded.tensors[name], tensor), name
    assert loaded.get(1, "fa_q")[0].shape == (4, 16) and loaded.get(1, "kv_v")[1].shape == (32,)


def test_same_inputs_give_byte_identical_recipes(calibrated, tmp_path):
    _recipe(calibrated).save(tmp_path / "a")
    _recipe(calibrated).save(tmp_path / "b")
    for name in (JSON_FILE, TENSORS_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_recipe_for_another_model_is_refused(calibrated):
    recipe = _recipe(calibrated)
    other = capture(tiny_model("gpt2"), 32)
    with pytest.raises(QpassError, match="another model"):
        recipe.check_matches(geometry(find_attention_sites(other.graph)))


def test_missing_or_corrupt_recipe_is_refused(calibrated, tmp_path):
    with pytest.raises(QpassError, match="needs recipe.json"):
        Recipe.load(tmp_path)
    _recipe(calibrated).save(tmp_path)
    doc = json.loads((tmp_path / JSON_FILE).read_text())
    doc["config"]["observer"] = "magic"
    (tmp_path / JSON_FILE).write_text(json.dumps(doc))
    with pytest.raises(QpassError, match="not a qpass recipe"):
        Recipe.load(tmp_path)


def test_config_is_validated_on_construction():
    with pytest.raises(ValueError, match="nothing to quantize"):
        QuantConfig()
    with pytest.raises(ValueError, match="observer"):
        QuantConfig(fa_quant=True, observer="magic")
    with pytest.raises(ValueError, match="kv_cache"):
        QuantConfig(kv_cache="int4")
