"""FuseQuantizedAttentionPass (qpass/passes/fx/fuse_quantized_attention.py), the first lowering stage: each attention
whose K and V carry the cache's Quantize/Dequantize becomes one ``int8_kv_attention`` (or, behind the dynamic cache's
fake quant, ``int8_kv_attention_dynamic``). What it leaves and what the op reads (structure), that it computes what
the Q/DQ program computes (numbers), and what it refuses before changing anything (negatives)."""

import pytest
import torch

from qpass.core.errors import QpassError
from qpass.frontends.torch_export.capture import param_names
from qpass.frontends.torch_export.decoder import capture_decoder
from qpass.frontends.torch_export.pipeline import quantize_program, unlift_decoder
from qpass.models.tiny import tiny_model
from qpass.passes.fx.find_attention_sites import find_attention_sites
from qpass.passes.fx.fuse_quantized_attention import (
    INT8_KV_ATTENTION,
    INT8_KV_ATTENTION_DYNAMIC,
    FuseQuantizedAttentionPass,
    verify_fused,
)
from qpass.passes.fx.patterns import FUSED_ATTENTION, SOFTMAX
from qpass.passes.fx.qdq import DEQUANTIZE, FAKE_QUANT_DYNAMIC, QUANTIZE
from tests.helpers.frontend_cases import calibrated

MAX_CONTEXT = 64
TOKENS = 37
MODES = {
    "kv-int8": dict(kv_cache="static"),
    "fa-quant": dict(fa_quant=True),
    "both": dict(fa_quant=True, kv_cache="static"),
    "dynamic": dict(kv_cache="dynamic"),
}


def quantized_decoder(mode: str, arch: str = "llama", quantize: bool = True):
    """``(reference program, its unlifted graph module)``: the tiny decoder (2 layers, 4 query / 2 KV heads, head_dim
    16) captured over 1 .. 64 tokens, with the Q/DQ of ``mode`` (none without ``quantize``)."""
    model = tiny_model(arch, num_layers=2)
    program = capture_decoder(model, MAX_CONTEXT)
    if quantize:
        observer = {} if mode == "dynamic" else {"observer": "minmax"}  # the dynamic cache calibrates no scale
        _, recipe = calibrated(model, torch.randint(0, 256, (4, 32)), **observer, **MODES[mode])
        program, _ = quantize_program(program, find_attention_sites(program.graph, param_names(program)), recipe)
    return program, unlift_decoder(program)


def _ops(gm, target):
    return gm.graph.find_nodes(op="call_function", target=target)


# structure and numbers


@pytest.mark.parametrize("mode", ["kv-int8", "fa-quant", "both"])
def test_one_generic_op_per_site_reading_the_last_kv_quantize(mode):
    """Per site one ``int8_kv_attention`` and no attention spelling; it reads the values the last Quantize on K and V
    quantizes (with both modes, FAQuant's, behind C8's round trip) and that Quantize's scale and offset; Q's FAQuant
    pair stays. The fused module computes the Q/DQ program's logits to 1e-4."""
    reference, gm = quantized_decoder(mode)
    sites = find_attention_sites(gm.graph)
    nodes = {n.name: n for n in gm.graph.nodes}
    expected_reads = []
    for site in sites:
        reads = []
        for kind in ("k", "v"):
            quant = nodes[getattr(site, kind)].args[0]  # the Dequantize attention reads, and its Quantize
            assert quant.target is QUANTIZE
            reads.append((quant.args[0], quant.args[1], quant.args[2]))
        expected_reads.append(reads)
    quantize_before = len(_ops(gm, QUANTIZE))
    fuse = FuseQuantizedAttentionPass(sites, MAX_CONTEXT)
    assert fuse(gm).modified and fuse.count == 2
    verify_fused(gm)
    fused = _ops(gm, INT8_KV_ATTENTION)
    assert len(fused) == 2 and not [n for n in gm.graph.nodes if n.target in FUSED_ATTENTION or n.target in SOFTMAX]
    for op, site, ((k, k_scale, k_offset), (v, v_scale, v_offset)) in zip(fused, sites, expected_reads):
        assert op.args[1] is k and op.args[2] is v
        assert [a.args[0] for a in op.args[3:7]] == [k_scale, k_offset, v_scale, v_offset]  # per_channel(...)
        assert op.args[7] == pytest.approx(site.head_dim**-0.5)
        q_is_quantized = op.args[0].target is DEQUANTIZE
        assert q_is_quantized == ("fa" in mode or mode == "both")
    assert len(_ops(gm, QUANTIZE)) == quantize_before - 4  # the pair on K and V that the op now stores
    ids = torch.randint(0, 256, (1, TOKENS))
    with torch.no_grad():
        expected = reference.module()(ids, torch.arange(TOKENS)[None])
        assert (gm(ids, torch.arange(TOKENS)[None]) - expected).abs().max().item() < 1e-4


def test_dynamic_cache_becomes_the_dynamic_op_without_scales():
    reference, gm = quantized_decoder("dynamic")
    sites = find_attention_sites(gm.graph)
    fuse = FuseQuantizedAttentionPass(sites, MAX_CONTEXT)
    assert fuse(gm).modified and fuse.count == 2
    ops = _ops(gm, INT8_KV_ATTENTION_DYNAMIC)
    assert len(ops) == 2 and not _ops(gm, INT8_KV_ATTENTION) and not _ops(gm, FAKE_QUANT_DYNAMIC)
    assert all(len(op.args) == 4 for op in ops)  # q, k, v, softmax scale: the scales come from K and V themselves
    ids = torch.randint(0, 256, (1, TOKENS))
    with torch.no_grad():
        expected = reference.module()(ids, torch.arange(TOKENS)[None])
        assert (gm(ids, torch.arange(TOKENS)[None]) - expected).abs().max().item() < 1e-4


# the pass contract and negatives


def test_no_sites_is_not_modified():
    _, gm = quantized_decoder("kv-int8")
    fuse = FuseQuantizedAttentionPass([], MAX_CONTEXT)
    assert fuse(gm).modified is False and fuse.count == 0
    assert len(_ops(gm, QUANTIZE)) == 4 and not _ops(gm, INT8_KV_ATTENTION)


def test_no_sites_leaves_the_graph_as_it_is():
    _, gm = quantized_decoder("kv-int8")
    before = [(n.op, n.target) for n in gm.graph.nodes]
    assert not FuseQuantizedAttentionPass([], MAX_CONTEXT)(gm).modified
    assert [(n.op, n.target) for n in gm.graph.nodes] == before


def test_after_fusing_no_attention_is_left_to_fuse():
    _, gm = quantized_decoder("kv-int8")
    FuseQuantizedAttentionPass(find_attention_sites(gm.graph), MAX_CONTEXT)(gm)
    with pytest.raises(QpassError, match="no attention found"):
        find_attention_sites(gm.graph)


@pytest.mark.xfail(
    strict=True, raises=KeyError, reason="a second run looks up the attention nodes the first one erased"
)
def test_a_second_run_changes_nothing():
    _, gm = quantized_decoder("kv-int8")
    fuse = FuseQuantizedAttentionPass(find_attention_sites(gm.graph), MAX_CONTEXT)
    assert fuse(gm).modified
    assert fuse(gm).modified is False


def test_attention_without_qdq_is_refused_before_any_change():
    _, gm = quantized_decoder("kv-int8", quantize=False)
    before = [(n.op, n.target) for n in gm.graph.nodes]
    with pytest.raises(QpassError, match=r"layer 0\): its K has no Quantize/Dequantize.*--kv-int8 or --fa-quant"):
        FuseQuantizedAttentionPass(find_attention_sites(gm.graph), MAX_CONTEXT)(gm)
    assert [(n.op, n.target) for n in gm.graph.nodes] == before


def test_a_mask_other_than_causal_is_refused_before_any_change():
    """Mistral's sliding window (8 tokens) over a 64-token context: not the causal mask the paged op applies."""
    _, gm = quantized_decoder("kv-int8", arch="mistral")
    before = [(n.op, n.target) for n in gm.graph.nodes]
    with pytest.raises(QpassError, match=r"layer 0\).*not the causal mask.*sliding window"):
        FuseQuantizedAttentionPass(find_attention_sites(gm.graph), MAX_CONTEXT)(gm)
    assert [(n.op, n.target) for n in gm.graph.nodes] == before


def test_k_and_v_in_different_forms_are_refused():
    _, gm = quantized_decoder("dynamic")
    fq = _ops(gm, FAKE_QUANT_DYNAMIC)[1]  # layer 0's K or V, the later one
    fq.replace_all_uses_with(fq.args[0])
    gm.graph.erase_node(fq)
    with pytest.raises(QpassError, match=r"layer 0\): one of K and V has the dynamic cache's fake quant"):
        FuseQuantizedAttentionPass(find_attention_sites(gm.graph), MAX_CONTEXT)(gm)
