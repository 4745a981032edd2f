"""Saturation: the counter against a direct count, the flag rule on matched and mismatched text, and what a
compile reports and warns (evaluation text, held-out calibration windows, repetitive calibration text)."""

import pytest
import torch

import qpass
from qpass.core import corpus, saturation
from qpass.core.config import QuantConfig
from qpass.core.int8 import QMAX, QMIN, affine_qparams, quantize
from qpass.models.loaders import LoadedModel
from qpass.models.tiny import tiny_model
from tests.helpers.frontend_cases import calibrated

SENTENCE = "The quick brown fox jumps over the lazy dog while the farmer watches from the porch."


def test_counter_by_hand():
    scale, offset = torch.tensor([0.1, 1.0]), torch.tensor([0.0, -128.0])  # channel 1 holds [0, 255]
    x = torch.tensor([[12.7, 255.0], [-12.8, 254.4], [-20.0, -1.0], [-12.7, 100.0]])
    asym = saturation.SaturationCounter(scale, offset, symmetric=False)
    asym.update(x)
    # channel 0: 127, -128, -200 (clipped) hit, -127 does not;
    # channel 1: 255 -> 127 and -1 -> -129 hit, 254.4 -> 126 not
    assert (asym.hits, asym.values) == (5, 8)
    sym = saturation.SaturationCounter(scale, torch.zeros(2), symmetric=True)
    sym.update(x)
    assert (sym.hits, sym.fraction) == (6, 6 / 8)  # symmetric limits are -127 and 127: -12.7 hits; 255, 254.4 clip


@pytest.mark.parametrize("symmetric", [False, True])
def test_counter_matches_a_direct_count_over_updates(symmetric):
    x = torch.randn(300, 24) * torch.linspace(0.5, 4.0, 24)
    scale, offset = affine_qparams(x.amin(0) * 0.6, x.amax(0) * 0.7, symmetric)  # narrow: some values clip
    counter = saturation.SaturationCounter(scale, offset, symmetric)
    for chunk in x.split(77):
        counter.update(chunk)
    q = quantize(x, scale, offset).int()
    low = -QMAX if symmetric else QMIN
    direct = int(((q <= low) | (q == QMAX)).sum())
    assert direct > 0 and counter.hits == direct and counter.values == x.numel()


def _measured(fe, recipe, windows):
    counted = saturation.counters(recipe)
    saturation.run(fe.counting_logits(fe.apply(recipe, verify=False)[0], counted), windows, 4)
    return saturation.section(recipe, counted, "eval", windows)


@pytest.fixture(scope="module")
def random_text():
    torch.manual_seed(0)
    model = tiny_model("llama")
    return model, torch.randint(0, 256, (16, 32)), torch.randint(0, 256, (8, 32))


@pytest.fixture(scope="module")
def fa_c8(random_text):
    model, calib, _ = random_text
    return calibrated(model, calib, fa_quant=True, kv_cache="static", observer="minmax")


def test_matched_text_is_not_flagged_and_narrow_scales_are(random_text, fa_c8):
    fe, recipe = fa_c8
    held = random_text[2]
    matched = _measured(fe, recipe, held)
    assert set(matched["measured"]) == {"0", "1"} and all(
        set(k) == {"q", "k", "v"} for k in matched["measured"].values()
    )
    assert matched["flagged"] == {} and saturation.warning(matched) is None
    # the same calibration figures with ranges 4x narrower: the evaluation text saturates far more
    narrow = recipe.replace(tensors={k: v / 4 if k.endswith("scale") else v for k, v in recipe.tensors.items()})
    flagged = _measured(fe, narrow, held)
    assert flagged["flagged"] == {"0": ["q", "k", "v"], "1": ["q", "k", "v"]}
    assert all(
        flagged["measured"][layer][kind] > 10 * matched["measured"][layer][kind]
        for layer in ("0", "1")
        for kind in ("q", "k", "v")
    )
    message = saturation.warning(flagged)
    assert "layer 0 q, layer 0 k" in message and "calibrate on text like the deployment text" in message


def test_repetitive_calibration_is_flagged_on_other_text(random_text):
    model, _, held = random_text
    fe, recipe = calibrated(model, torch.arange(8).repeat(64).view(16, 32), kv_cache="static")  # 8 tokens over and over
    sat = _measured(fe, recipe, held)
    assert set(sat["flagged"]) == {"0", "1"} and set(sat["calibration"]["0"]) == {"k", "v"}


def test_kinds_without_static_scales_are_not_counted(fa_c8):
    _, recipe = fa_c8  # as a dynamic KV cache would leave it: no C8 scales for v, no FAQuant ones
    k_only = recipe.replace(tensors={k: v for k, v in recipe.tensors.items() if ".kv_k." in k})
    assert set(saturation.counters(k_only)) == {(0, "k"), (1, "k")}
    sat = saturation.section(k_only, None, None, None)
    assert sat["measured_on"] is None and sat["measured"] == {} and sat["calibration"]["1"].keys() == {"k"}


@pytest.fixture(scope="module")
def tiny(smollm2_tokenizer):
    return LoadedModel(tiny_model("llama", vocab_size=len(smollm2_tokenizer)), smollm2_tokenizer, "test", "tiny")


@pytest.fixture(scope="module")
def text_paths(tmp_path_factory):
    return corpus.write(tmp_path_factory.mktemp("corpus"))


CONFIG = QuantConfig(fa_quant=True, kv_cache="static")
RUN = qpass.RunSettings(window=64, calib_samples=64, batch_size=4, eval_windows=4)


def test_healthy_calibration_compiles_without_warnings(tiny, text_paths, capsys):
    report = qpass.compile(tiny, CONFIG, eval=text_paths["prose"], run=RUN).report
    assert report["warnings"] == [] and capsys.readouterr().err == ""
    sat = report["saturation"]
    assert sat["measured_on"] == "eval" and sat["tokens"] == 4 * 64 and sat["flagged"] == {}
    assert set(sat["calibration"]) == set(sat["measured"]) == {"0", "1"}
    assert report["calibration"]["held_out_windows"] == 0  # with --eval every calibration window fits the ranges


def test_repeated_sentence_warns_twice_with_the_fix(tiny, text_paths, capsys):
    report = qpass.compile(tiny, CONFIG, calib=[SENTENCE] * 10, eval=text_paths["code"], run=RUN).report
    err = capsys.readouterr().err.splitlines()
    assert err == [f"qpass: {w}" for w in report["warnings"]] and len(err) == 2
    assert "repeat an earlier one" in err[0] and "calibrate on at least 2048 tokens" in err[0]
    assert (
        "on the evaluation text" in err[1]
        and "layer 0 q" in err[1]
        and "calibrate on text like the deployment text" in err[1]
    )
    assert "flagged: saturation" in qpass.core.report.summary(report)


def test_without_eval_saturation_is_measured_on_held_out_windows(tiny, capsys):
    report = qpass.compile(tiny, CONFIG, run=RUN).report
    assert report["calibration"]["windows"] == 56 and report["calibration"]["held_out_windows"] == 8
    sat = report["saturation"]
    assert sat["measured_on"] == "held_out" and sat["windows"] == 8 and set(sat["measured"]) == {"0", "1"}
    assert "8 held-out calibration windows vs calibration" in qpass.core.report.summary(report)
    assert report["warnings"] == [] and capsys.readouterr().err == ""


def test_flag_rule():
    assert saturation.flagged({"0": {"k": 5e-4, "v": 2e-3}}, {"0": {"k": 0.0, "v": 1e-4}}) == {"0": ["v"]}  # floor 1e-3
    assert saturation.flagged({"0": {"k": 4e-3}}, {"0": {"k": 5e-4}}) == {}  # under 10x the calibration's
    assert saturation.flagged({"0": {"k": 0.02}}, {"0": {"k": 0.05}}) == {"0": ["k"]}  # over the 1% ceiling regardless
    assert saturation.flagged({"1": {"q": 5e-3, "k": 0.02}}, {}) == {
        "1": ["k"]
    }  # no calibration figure: the ceiling alone
