"""Attention-site discovery: structure on five architectures and two spellings, and the negatives."""

import pytest
import torch
import torch.nn.functional as F

from qpass.api import param_names
from qpass.capture import capture
from qpass.errors import QpassError
from qpass.models.tiny import ARCHITECTURES, NoAttention, tiny_config, tiny_model
from qpass.passes.find_attention_sites import find_attention_sites

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
