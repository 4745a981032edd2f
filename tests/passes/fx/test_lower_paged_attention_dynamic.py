"""Lowering the dynamic int8 cache (``--kv-int8 dynamic``): the generic op, the paged ops with their scale
caches, and greedy token-for-token match with the fake-quant program (the generic op's refusals:
test_fuse_quantized_attention.py)."""

import pytest
import torch

from qpass.core.int8 import quantize_dynamic
from qpass.frontends.torch_export.decoder import build_decoder, decoder_layout, generate_lowered, generate_reference
from qpass.passes.fx.fuse_quantized_attention import INT8_KV_ATTENTION_DYNAMIC
from qpass.passes.fx.lower_paged_attention import (
    CACHE_WRITE,
    CACHE_WRITE_DYNAMIC,
    PAGED_ATTENTION,
    PAGED_ATTENTION_DYNAMIC,
    LowerPagedAttentionPass,
)
from qpass.passes.fx.qdq import FAKE_QUANT_DYNAMIC
from tests.helpers.frontend_cases import calibrated
from tests.helpers.paged_cases import fused_decoder, prefill, tiny

NEW_TOKENS = 12


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread, as in test_lower_paged_attention.py (tiny models, shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dynamic_recipe(model, **config):
    return calibrated(model, torch.randint(0, 256, (4, 32)), kv_cache="dynamic", **config)[1]


@pytest.mark.parametrize(
    "arch, config", [("llama", {}), ("gpt2", {}), ("qwen2", {"w8a8": True})], ids=["llama", "gpt2", "qwen2-w8a8"]
)
def test_lowered_decoder_writes_scale_caches_and_matches_greedy_tokens(arch, config):
    torch.manual_seed(0)
    model = tiny(arch)
    reference, lowered = build_decoder(model, dynamic_recipe(model, **config), max_context=128)
    targets = [n.target for n in lowered.graph.nodes]
    assert targets.count(CACHE_WRITE_DYNAMIC) == targets.count(PAGED_ATTENTION_DYNAMIC) == 2
    assert CACHE_WRITE not in targets and PAGED_ATTENTION not in targets and FAKE_QUANT_DYNAMIC not in targets
    assert list(lowered.graph_signature.user_inputs)[2:10] == [
        "key_cache_0",
        "value_cache_0",
        "key_scale_cache_0",
        "value_scale_cache_0",
        "key_cache_1",
        "value_cache_1",
        "key_scale_cache_1",
        "value_scale_cache_1",
    ]
    assert decoder_layout(lowered)["kv_cache"] == "dynamic"
    prompt = torch.randint(0, 256, (8,), generator=torch.Generator().manual_seed(1))
    expected = generate_reference(reference, prompt, NEW_TOKENS)
    assert len(set(expected)) > 3  # a varied continuation, so that matching it means something
    assert generate_lowered(lowered, prompt, NEW_TOKENS) == expected


def test_lowering_goes_through_the_generic_dynamic_op():
    model = tiny("llama")
    reference, _ = build_decoder(model, dynamic_recipe(model), max_context=128)
    gm = fused_decoder(reference, INT8_KV_ATTENTION_DYNAMIC)
    assert not gm.graph.find_nodes(op="call_function", target=FAKE_QUANT_DYNAMIC)
    lower = LowerPagedAttentionPass()
    assert lower(gm).modified and lower.count == 2
    assert len(gm.graph.find_nodes(op="call_function", target=CACHE_WRITE_DYNAMIC)) == 2
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert "key_scale_cache_1" in names and "value_scale_cache_1" in names


def test_prefill_of_one_layer_stores_the_formula_and_matches_the_logits():
    """One layer: the caches hold what quantize_dynamic gives for the model's own K and V (read from its eager
    attention), and the logits agree with the fake-quant program's to float rounding."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = tiny("llama", num_layers=1)
    reference, lowered = build_decoder(model, dynamic_recipe(model), max_context=128)
    ids = torch.randint(0, 256, (1, 37))
    with torch.no_grad():
        expected = reference.module()(ids, torch.arange(37)[None])
    logits, caches = prefill(lowered, ids)
    assert (logits - expected).abs().max().item() < 1e-4

    seen = {}

    def record(module, query, key, value, *args, **kwargs):
        seen["k"], seen["v"] = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [tokens, kv_heads, head_dim]
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register("qpass_test_record_kv", record)
    model.set_attn_implementation("qpass_test_record_kv")
    with torch.no_grad():
        model(ids)
    for kind, cache, scale_cache in (("k", caches[0][0], caches[0][2]), ("v", caches[0][1], caches[0][3])):
        codes, scales, offsets = quantize_dynamic(seen[kind])  # one sequence from block 0: its tokens in slots 0 .. 36
        stored = cache.view(-1, *cache.shape[2:])[:37]
        assert (stored.int() - codes.int()).abs().max() <= 1 and (stored != codes).float().mean() < 1e-3, kind
        stored_qparams = scale_cache.view(-1, cache.shape[2], 2)[:37]
        assert torch.allclose(stored_qparams[..., 0], scales[..., 0], rtol=1e-5, atol=0), kind
        assert (stored_qparams[..., 1] - offsets[..., 0]).abs().max() <= 1, kind  # an offset is a rounded integer
