"""The one compile road (:mod:`qpass.core.compile`): it asks a frontend only what the protocol declares, in every
mode, and the whole-model and layer-wise modes of one model give the same report figures."""

import typing

import pytest

import qpass
from qpass.core.compile import Texts, compile_model
from qpass.core.config import QuantConfig, RunSettings
from qpass.core.data import read_samples, read_text
from qpass.core.frontend import Frontend

PROTOCOL = set(typing.get_type_hints(Frontend)) | {n for n in vars(Frontend) if not n.startswith("_")}
RUN = RunSettings(window=32, calib_samples=6, batch_size=2, eval_windows=3)


class _Spy:
    """A frontend seen through the protocol: records each attribute the road asks for."""

    def __init__(self, inner):
        self._inner, self.asked = inner, set()

    def __getattr__(self, name):
        self.asked.add(name)
        return getattr(self._inner, name)


@pytest.fixture(scope="module")
def texts(text_files):
    return Texts(read_samples(text_files["calib"]), "calib", read_text(text_files["prose"]), "prose")


@pytest.mark.parametrize("layerwise", [False, True])
def test_the_road_asks_the_frontend_only_what_the_protocol_declares(tiny_model_dir, texts, layerwise):
    spy = _Spy(qpass.open_model(str(tiny_model_dir), RUN.window, layerwise=layerwise))
    compiled = compile_model(spy, QuantConfig(fa_quant=True, kv_cache="static"), RUN, texts)
    assert spy.asked <= PROTOCOL, spy.asked - PROTOCOL
    assert {"attention_sites", "window_nll", "apply", "decoder", "layerwise"} <= spy.asked
    assert compiled.layerwise is layerwise and (compiled.program is None) is layerwise
    assert compiled.report["run"] == {"window": 32, "batch_size": 2, "calib_samples": 6, "eval_windows": 3}
    assert compiled.recipe.stats["calibrated_with"] == {"window": 32}


def test_whole_and_layerwise_modes_report_the_same_figures(tiny_model_dir, texts):
    config = QuantConfig(kv_cache="static")
    whole, layerwise = (
        compile_model(qpass.open_model(str(tiny_model_dir), RUN.window, layerwise=mode), config, RUN, texts).report
        for mode in (False, True)
    )
    assert whole["eval"]["ppl_reference"] is not None and layerwise["eval"]["ppl_reference"] is None
    for key in ("ppl_float", "ppl_quant"):
        assert layerwise["eval"][key] == pytest.approx(whole["eval"][key], rel=1e-6), key
    assert layerwise["saturation"]["measured"] == whole["saturation"]["measured"]
    assert layerwise["calibration"]["layerwise"] is True and "layerwise" not in whole["calibration"]
