"""Smoothing: the groups found in the graph (structure), the passes keep the float function (numbers), negatives."""

import pytest
import torch

from qpass.api import param_names
from qpass.capture import capture
from qpass.models.tiny import NoAttention, tiny_model
from qpass.passes.awq_scale import AWQScalePass
from qpass.passes.find_linear_sites import find_linear_sites, find_smoothing_groups
from qpass.passes.iterative_smooth import IterativeSmoothPass
from qpass.passes.smooth_quant import SmoothQuantPass, module_param
from qpass.passes.smooth_quant_shift import SmoothQuantShiftPass
from qpass.linear_observer import quantized_output_error
from qpass.w8a8_calibrate import attach_linear_observers, detach, run

WINDOW = 16
PASSES = {"m1": SmoothQuantPass, "m2": SmoothQuantShiftPass, "m3": AWQScalePass, "m4": IterativeSmoothPass}


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama", num_layers=2)
    with torch.no_grad():  # outlier channels in the residual stream, as real LLMs have
        model.model.embed_tokens.weight[:, 3] *= 30.0
        model.model.layers[0].post_attention_layernorm.weight[7] = 20.0
    return model, capture(model, WINDOW)


def test_groups_are_norm_to_qkv_and_gate_up_v_to_o_and_up_to_down(llama):
    _, program = llama
    names = param_names(program)
    linears = find_linear_sites(program.graph, names)
    assert len(linears) == 14 and all("lm_head" not in s.module for s in linears)
    groups = find_smoothing_groups(program.graph, linears, names)
    assert [(g.prev.split(".", 3)[-1], g.prev_kind, [c.split(".")[-1] for c in g.consumers], g.group, g.head_dim)
            for g in groups[:4]] == [
        ("input_layernorm", "norm", ["q_proj", "k_proj", "v_proj"], 1, None),
        ("self_attn.v_proj", "linear", ["o_proj"], 2, 16),  # GQA: 2 kv heads feed 4 heads of head_dim 16
        ("post_attention_layernorm", "norm", ["gate_proj", "up_proj"], 1, None),
        ("mlp.up_proj", "linear", ["down_proj"], 1, None),
    ]
    assert len(groups) == 8
    assert groups[1].channels == 32 and groups[3].channels == 128


def test_no_groups_and_no_head_in_a_graph_without_norms():
    program = torch.export.export(NoAttention(), (torch.zeros(2, WINDOW, dtype=torch.long),))
    names = param_names(program)
    linears = find_linear_sites(program.graph, names)
    assert [s.module for s in linears] == ["mlp.0"]  # mlp.2 produces the logits: the head stays float
    assert find_smoothing_groups(program.graph, linears, names) == []  # its input is an embedding, not a norm


@pytest.mark.parametrize("method", ["m1", "m2", "m3", "m4"])
def test_smoothing_keeps_the_float_function_and_leaves_the_model_alone(llama, method):
    model, program = llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = param_names(program)
    linears = find_linear_sites(program.graph, names)
    groups = find_smoothing_groups(program.graph, linears, names)
    ids = torch.randint(0, 256, (4, WINDOW))
    gm = program.module()
    reference = gm(ids)
    stats = attach_linear_observers(gm, sorted({g.input for g in groups}), stride=1)
    run(gm, ids, 2, "stats")
    detach(gm, stats)
    smoother = PASSES[method](groups, stats, act_method=1)
    norm_before = module_param(gm, "model.layers.0.input_layernorm.weight").clone()
    result = smoother(gm)
    assert result.modified
    assert len(smoother.scales) == len(groups) and [s.shape[0] for s in smoother.scales] == [g.channels for g in groups]
    assert not torch.equal(module_param(gm, "model.layers.0.input_layernorm.weight"), norm_before)
    torch.testing.assert_close(gm(ids), reference, rtol=1e-4, atol=1e-4)  # exact up to float rounding
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_awq_search_never_does_worse_than_no_smoothing_on_the_sample(llama):
    _, program = llama
    names = param_names(program)
    linears = find_linear_sites(program.graph, names)
    groups = find_smoothing_groups(program.graph, linears, names)
    gm = program.module()
    stats = attach_linear_observers(gm, sorted({g.input for g in groups}), stride=1)
    run(gm, torch.randint(0, 256, (4, WINDOW)), 2, "stats")
    weights = {g.input: torch.cat([module_param(gm, f"{c}.weight").detach() for c in g.consumers]) for g in groups}
    smoother = AWQScalePass(groups, stats)
    smoother(gm)
    assert all(0.0 <= r <= 1.0 for r in smoother.exponents)
    assert set(smoother.statistics) <= {"mean", "max"} and len(smoother.statistics) == len(groups)
    assert any(r > 0 for r in smoother.exponents)  # the outlier channels are worth smoothing
    for g, s in zip(groups, smoother.scales):
        obs, w = stats[g.input], weights[g.input]
        full = s if g.group == 1 else s.view(-1, 1, g.head_dim).expand(-1, g.group, g.head_dim).reshape(-1)
        error = lambda scale: quantized_output_error(obs.sample(), w, scale, 1, None, obs.min, obs.max)  # noqa: E731
        assert error(full) <= error(torch.ones_like(full)) * (1 + 1e-6)


def test_awq_takes_max_statistic_for_a_sink_token_outlier():
    """One token with one channel 500x the rest (the attention sink of real LLMs): ``mean|X|^r`` hardly
    moves that channel, ``max|X|^r`` does, and the relative per-token error sees what the per-tensor
    step costs every other token."""
    from qpass.linear_observer import LinearObserver
    from qpass.passes.find_linear_sites import SmoothGroup

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=gen)
    x[0, 5] = 1000.0
    weight = torch.randn(32, 64, generator=gen) * 0.05
    obs = LinearObserver(stride=1, max_tokens=512)
    obs(x)
    group = SmoothGroup("x", "prev", "norm", ("fc",), 64)
    smoother = AWQScalePass([group], {"x": obs})
    scale = smoother.group_scale(group, obs, weight)
    assert smoother.statistics == ["max"] and smoother.exponents[0] > 0
    none, mean_only = torch.ones(64), obs.mean_abs.pow(smoother.exponents[0])
    error = lambda s: quantized_output_error(x, weight, s, 1)  # noqa: E731
    assert error(scale) < 0.1 * error(none)
    assert error(scale) < error(mean_only / (mean_only.max() * mean_only.min()).sqrt())
