"""W8A8 on the real SmolLM2-135M: structure found in the real graph, smoothing exactness, int8 Linears, accuracy."""

import pytest
import torch

import qpass
from qpass.core import corpus
from qpass.core.calibrate import calibrate
from qpass.core.config import QuantConfig
from qpass.core.data import token_windows
from qpass.core.evaluate import perplexity
from qpass.frontends.torch_export.capture import param_names
from qpass.frontends.torch_export.pipeline import quantize_program, smoothed_state_dict
from qpass.passes.fx.find_linear_sites import find_linear_sites, find_smoothing_groups
from qpass.passes.fx.patterns import W8A8_LINEAR
from tests.helpers.frontend_cases import frontend

pytestmark = pytest.mark.slow
WINDOW = 128


@pytest.fixture(scope="module")
def smollm2():
    loaded = qpass.load_model("default")
    return loaded, frontend(loaded.model, WINDOW)


def test_210_linears_and_120_smoothing_groups_found_by_structure(smollm2):
    program = smollm2[1].program
    names = param_names(program)
    linears = find_linear_sites(program.graph, names)
    assert len(linears) == 210  # 30 layers x (q, k, v, o, gate, up, down); lm_head (tied to the embedding) stays float
    groups = find_smoothing_groups(program.graph, linears, names)
    assert len(groups) == 120
    assert {(g.prev_kind, len(g.consumers), g.group, g.head_dim) for g in groups} == {
        ("norm", 3, 1, None),
        ("linear", 1, 3, 64),
        ("norm", 2, 1, None),
        ("linear", 1, 1, None),
    }


def test_m3_w8a8_smoothing_is_exact_and_w8a8_stays_close(smollm2):
    loaded, fe = smollm2
    program, sites = fe.program, fe.attention_sites()
    torch.set_num_threads(1)  # OpenMP thrashes on a shared machine
    calib = token_windows(loaded.tokenizer, corpus.calibration_samples(), WINDOW, 8, "--calib")
    evals = token_windows(loaded.tokenizer, [corpus.eval_prose()], WINDOW, 4, "--eval")
    recipe = calibrate(fe, calib, QuantConfig(w8a8=True, act_method=3, anti_method="m3"))
    assert len(recipe.w8a8["smooth"]) == 120
    # smoothing alone keeps the float function
    smoothed = smoothed_state_dict(program, recipe)
    with torch.no_grad():
        ref = program.module()(evals[:1])
        out = torch.func.functional_call(program.module(), {k: v for k, v in smoothed.items()}, (evals[:1],))
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    quantized, counts = quantize_program(program, sites, recipe)
    assert counts == {"InsertW8A8Pass": 210}
    assert len(quantized.graph.find_nodes(op="call_function", target=W8A8_LINEAR)) == 210
    ppl_float = perplexity(program.module(), evals, 4)
    ppl_quant = perplexity(quantized.module(), evals, 4)
    assert ppl_quant / ppl_float - 1 < 0.25, (ppl_float, ppl_quant)  # every Linear int8, no fallback
