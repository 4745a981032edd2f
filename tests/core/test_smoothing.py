"""Smoothing: the groups found in the graph (structure), the methods keep the float function (numbers), negatives."""

import pytest
import torch

from qpass.core.observers import Observer
from qpass.core.sites import SmoothGroup
from qpass.core.smoothing import apply_smoothing, consumer_scale, m3_scale, smoothing_scales
from qpass.core.w8a8 import quantized_output_error
from qpass.frontends.torch_export.capture import param_names
from qpass.frontends.torch_export.frontend import set_parameters
from qpass.models.tiny import NoAttention, tiny_model
from qpass.passes.fx.find_linear_sites import find_linear_sites, find_smoothing_groups
from tests.helpers.frontend_cases import frontend

WINDOW = 32


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama", num_layers=2)
    with torch.no_grad():  # outlier channels in the residual stream, as real LLMs have
        model.model.embed_tokens.weight[:, 3] *= 30.0
        model.model.layers[0].post_attention_layernorm.weight[7] = 20.0
    return model, frontend(model, WINDOW)


def test_groups_are_norm_to_qkv_and_gate_up_v_to_o_and_up_to_down(llama):
    program = llama[1].program
    names = param_names(program)
    linears = find_linear_sites(program.graph, names)
    assert len(linears) == 14 and all("lm_head" not in s.module for s in linears)
    groups = find_smoothing_groups(program.graph, linears, names)
    assert [
        (g.prev.split(".", 3)[-1], g.prev_kind, [c.split(".")[-1] for c in g.consumers], g.group, g.head_dim)
        for g in groups[:4]
    ] == [
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


def _group_stats(fe, ids):
    linears = fe.linear_sites()
    groups = fe.smoothing_groups(linears)
    stats = {name: Observer() for name in sorted({g.input for g in groups})}
    fe.observe(ids, stats, 2, desc="stats")
    return groups, stats


@pytest.mark.parametrize("method", ["m1", "m2", "m3", "m4"])
def test_smoothing_keeps_the_float_function_and_leaves_the_model_alone(llama, method):
    model, fe = llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 256, (4, WINDOW))
    reference = fe.logits()(ids)
    groups, stats = _group_stats(fe, ids)
    state = fe.state_dict()
    scales, chosen = smoothing_scales(method, groups, stats, state, act_method=1, alpha=0.5)
    assert len(scales) == len(chosen) == len(groups) and [s.shape[0] for s in scales] == [g.channels for g in groups]
    docs = [g.to_recipe(f"s{i}") for i, g in enumerate(groups)]
    smoothed = apply_smoothing(state, docs, {f"s{i}": s for i, s in enumerate(scales)})
    assert not torch.equal(
        smoothed["model.layers.0.input_layernorm.weight"], state["model.layers.0.input_layernorm.weight"]
    )
    gm = fe.program.module()
    set_parameters(gm, smoothed)
    torch.testing.assert_close(gm(ids), reference, rtol=1e-4, atol=1e-4)  # exact up to float rounding
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_awq_search_never_does_worse_than_no_smoothing_on_the_sample(llama):
    _, fe = llama
    groups, stats = _group_stats(fe, torch.randint(0, 256, (4, WINDOW)))
    state = fe.state_dict()
    scales, chosen = smoothing_scales("m3", groups, stats, state, act_method=1, alpha=0.5)
    assert all(0.0 <= c["exponent"] <= 1.0 and c["statistic"] in ("mean", "max") for c in chosen)
    assert any(c["exponent"] > 0 for c in chosen)  # the outlier channels are worth smoothing
    for g, s in zip(groups, scales):
        obs, w = stats[g.input], torch.cat([state[f"{c}.weight"] for c in g.consumers])
        full = consumer_scale(s, g.group, g.head_dim)
        error = lambda scale: quantized_output_error(obs.sample(), w, scale, 1, None, obs.min, obs.max)  # noqa: E731
        assert error(full) <= error(torch.ones_like(full)) * (1 + 1e-6)


def test_awq_takes_max_statistic_for_a_sink_token_outlier():
    """One token with one channel 500x the rest (the attention sink of real LLMs): ``mean|X|^r`` hardly
    moves that channel, ``max|X|^r`` does, and the relative per-token error sees what the per-tensor
    step costs every other token."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=gen)
    x[0, 5] = 1000.0
    weight = torch.randn(32, 64, generator=gen) * 0.05
    obs = Observer(stride=1, max_tokens=512)
    obs.update(x)
    group = SmoothGroup("x", "prev", "norm", ("fc",), 64)
    scale, chosen = m3_scale(group, obs, weight, 1, 0.5)
    assert chosen["statistic"] == "max" and chosen["exponent"] > 0
    none, mean_only = torch.ones(64), obs.mean_abs.pow(chosen["exponent"])
    error = lambda s: quantized_output_error(x, weight, s, 1)  # noqa: E731
    assert error(scale) < 0.1 * error(none)
    assert error(scale) < error(mean_only / (mean_only.max() * mean_only.min()).sqrt())
