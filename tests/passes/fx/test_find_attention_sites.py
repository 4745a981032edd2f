"""Attention-site discovery: structure on five architectures and two spellings, and the negatives."""

import pytest
import torch
import torch.nn.functional as F

from qpass.core.errors import QpassError
from qpass.frontends.torch_export.capture import capture, param_names
from qpass.models.tiny import ARCHITECTURES, NoAttention, tiny_config, tiny_model
from qpass.passes.fx.find_attention_sites import find_attention_sites
from qpass.passes.fx.find_linear_sites import find_linear_sites, find_smoothing_groups
from qpass.passes.fx.patterns import ATTENTION_SPELLINGS
from tests.helpers.frontend_cases import frontend

EXPECTED = {  # arch: (kv heads, rope, qk_norm)
    "llama": (2, True, False),
    "qwen2": (2, True, False),
    "mistral": (2, True, False),
    "gemma3": (2, True, True),
    "gpt2": (4, False, False),
}


@pytest.mark.parametrize("impl,form", [("sdpa", "sdpa"), ("eager", "matmul-softmax-matmul")])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sites_found_by_structure(arch, impl, form):
    program = capture(tiny_model(arch, num_layers=3, attn_implementation=impl), window=16)
    sites = find_attention_sites(program.graph, param_names(program))
    kv_heads, rope, qk_norm = EXPECTED[arch]
    assert [s.layer for s in sites] == [0, 1, 2]
    nodes = {n.name: n for n in program.graph.nodes}
    for site in sites:
        assert (site.form, site.num_heads, site.num_kv_heads, site.head_dim) == (form, 4, kv_heads, 16)
        assert (site.rope, site.qk_norm) == (rope, qk_norm)
        # K and V are taken before GQA's repeat: [B, H_kv, S, D], the shape a KV cache stores.
        assert tuple(nodes[site.k].meta["val"].shape)[1:] == (kv_heads, 16, 16)
        assert tuple(nodes[site.v].meta["val"].shape)[1:] == (kv_heads, 16, 16)
        assert tuple(nodes[site.q].meta["val"].shape)[1:] == (4, 16, 16)
        assert f"layers.{site.layer}." in site.k_from or f"h.{site.layer}." in site.k_from
        # the site carries its attention module's path, the common parent of its projections
        assert site.prefix in (f"model.layers.{site.layer}.self_attn", f"transformer.h.{site.layer}.attn")
        assert all(p.startswith(site.prefix + ".") for p in site.projections)


def test_every_finder_matches_attention_through_one_table():
    assert [s.name for s in ATTENTION_SPELLINGS] == ["sdpa", "matmul-softmax-matmul"]
    # v_proj -> o_proj smoothing goes through attention in both spellings (it once knew only sdpa)
    for impl in ("sdpa", "eager"):
        program = capture(tiny_model("llama", num_layers=2, attn_implementation=impl), 16)
        names = param_names(program)
        groups = find_smoothing_groups(program.graph, find_linear_sites(program.graph, names), names)
        v_to_o = [g for g in groups if g.prev.endswith("v_proj")]
        assert [g.consumers for g in v_to_o] == [(f"model.layers.{i}.self_attn.o_proj",) for i in range(2)], impl
        assert all(g.group == 2 and g.head_dim == 16 for g in v_to_o)


def test_layers_group_each_attention_with_its_linears():
    layers = list(frontend(tiny_model("llama", num_layers=3), 16).layers())
    assert [layer.index for layer in layers] == [0, 1, 2]
    for layer in layers:
        modules = [s.module.removeprefix(f"model.layers.{layer.index}.") for s in layer.linears]
        assert modules == [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ]
        assert layer.attention.layer == layer.index


def test_sliding_window_layers_are_all_found():
    config = tiny_config("gemma3", num_layers=4)
    assert "sliding_attention" in config.layer_types and "full_attention" in config.layer_types
    program = capture(tiny_model("gemma3", num_layers=4), window=16)
    assert len(find_attention_sites(program.graph)) == 4


def test_no_attention_is_an_error():
    program = torch.export.export(NoAttention(), (torch.zeros(2, 8, dtype=torch.long),))
    with pytest.raises(QpassError, match="no attention found"):
        find_attention_sites(program.graph)


class ThreeDimAttention(torch.nn.Module):
    """sdpa over [B, S, D]: no head dimension, which qpass cannot quantize per head."""

    def forward(self, x):
        return F.scaled_dot_product_attention(x, x, x)


def test_attention_without_head_dim_is_an_error():
    program = torch.export.export(ThreeDimAttention(), (torch.randn(2, 8, 16),))
    with pytest.raises(QpassError, match=r"\[B, H, S, D\]"):
        find_attention_sites(program.graph)


class SoftmaxOnly(torch.nn.Module):
    """A softmax that is not attention (no q @ k^T in front of it) must not be taken for one."""

    def forward(self, x):
        return torch.softmax(x @ x, dim=-1) @ x


def test_softmax_without_attention_pattern_is_not_a_site():
    program = torch.export.export(SoftmaxOnly(), (torch.randn(2, 4, 8, 8),))
    with pytest.raises(QpassError, match="no attention found"):
        find_attention_sites(program.graph)
