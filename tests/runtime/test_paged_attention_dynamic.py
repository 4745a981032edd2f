"""The dynamic int8 KV cache (an asymmetric scale and offset per token and kv head): its formula, the cache write, the
folded PyTorch paged ops against the dequantizing references, argument errors, and torch.export of the ops."""

import math

import pytest
import torch

from qpass.core.errors import QpassError
from qpass.core.int8 import dequantize, dynamic_qparams, fake_quant_dynamic, quantize_dynamic
from qpass.runtime import (
    BlockAllocator,
    BlockTables,
    allocate_kv_cache,
    allocate_kv_scale_cache,
    fake_quant_int8_dynamic,
    paged_attention_int8_dynamic,
    paged_attention_int8_dynamic_reference,
    paged_prefill_attention_int8_dynamic,
    paged_prefill_attention_int8_dynamic_reference,
    reshape_and_cache_int8_dynamic,
)
from tests.helpers.paged_cases import make_dynamic_case, rel_err

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def test_formula_is_asymmetric_min_max_per_row():
    x = torch.randn(2, 3, 5, 64) * torch.tensor([0.01, 1.0, 300.0])[None, :, None, None]
    x[1, 1, 1] = x[1, 1, 1].abs() + 0.5  # a row of one sign: its range is widened to include 0
    x[0, 0, 0] = 0.0  # a row of zeros: scale 1
    codes, scale, offset = quantize_dynamic(x)
    assert codes.dtype == torch.int8 and scale.dtype == offset.dtype == torch.float32
    assert scale.shape == offset.shape == (2, 3, 5, 1)
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
    expected = (hi - lo) / 255
    expected[0, 0, 0] = 1.0
    assert torch.equal(scale, expected) and torch.equal(offset, (torch.round(-lo / expected) - 128).clamp(-128, 127))
    assert all(torch.equal(a, b) for a, b in zip(dynamic_qparams(x), (scale, offset)))
    assert codes[0, 0, 0].eq(-128).all() and offset[0, 0, 0].eq(-128).all()  # zeros: code == offset, read back as 0
    used = x.abs().amax(dim=-1) > 0
    both = (x.amin(dim=-1) < 0) & (x.amax(dim=-1) > 0)  # rows of both signs use the whole code range
    assert (codes.int().amax(dim=-1) - codes.int().amin(dim=-1))[both].min() >= 254
    assert codes[1, 1, 1].min() >= offset[1, 1, 1, 0] and offset[1, 1, 1, 0] == -128  # one sign: 0 is code -128
    back = dequantize(codes, scale, offset, torch.float32)
    assert ((back - x).abs() <= scale / 2 * (1 + 1e-5) + 1e-6 * x.abs()).all()
    symmetric_step = x.abs().amax(dim=-1, keepdim=True) / 127
    assert (scale[used] <= symmetric_step[used] * (1 + 1e-6)).all()  # never coarser than absmax / 127
    assert torch.equal(fake_quant_dynamic(x), back) and torch.equal(fake_quant_int8_dynamic(x), back)
    half = x[1].to(torch.bfloat16)
    assert fake_quant_int8_dynamic(half).dtype == torch.bfloat16


def test_write_stores_codes_and_scales_per_token_and_head_and_skips_minus_one():
    kv_heads, head_dim, block_size = 2, 64, 16
    key_cache, value_cache = allocate_kv_cache(6, block_size, kv_heads, head_dim)
    k_scales, v_scales = allocate_kv_scale_cache(6, block_size, kv_heads)
    assert k_scales.shape == (6, block_size, kv_heads, 2) and k_scales.dtype == torch.float32
    for t in (key_cache, value_cache):
        t.fill_(55)
    for t in (k_scales, v_scales):
        t.fill_(-1.0)
    key = (
        torch.randn(20, kv_heads, head_dim) * torch.linspace(0.1, 10, 20)[:, None, None]
    )  # scales that differ per token
    value = torch.randn(20, kv_heads, head_dim)
    tables = BlockTables(BlockAllocator(6), block_size)
    tables.append_tokens(9, 3)  # another sequence takes block 0
    slots = tables.append_tokens(0, 20)
    slots[[4, 11]] = -1
    reshape_and_cache_int8_dynamic(key, value, key_cache, value_cache, slots, k_scales, v_scales)

    written = slots >= 0
    for x, cache, scales in ((key, key_cache, k_scales), (value, value_cache, v_scales)):
        codes, scale, offset = quantize_dynamic(x[written])
        assert torch.equal(cache.view(-1, kv_heads, head_dim)[slots[written]], codes)
        assert torch.equal(scales.view(-1, kv_heads, 2)[slots[written]], torch.cat([scale, offset], dim=-1))
        untouched = torch.ones(cache.shape[0] * block_size, dtype=torch.bool)
        untouched[slots[written]] = False
        assert (cache.view(-1, kv_heads, head_dim)[untouched] == 55).all()
        assert (scales.view(-1, kv_heads, 2)[untouched] == -1).all()


@pytest.mark.parametrize(
    "lens, heads, kv_heads, head_dim, block_size, dtype",
    [
        ([1, 37, 16], 4, 4, 64, 16, torch.float32),
        ([200, 5], 8, 2, 128, 32, torch.float16),
        ([130, 3000], 6, 2, 64, 128, torch.bfloat16),  # more keys than one chunk of the folded path
        ([45], 2, 1, 256, 64, torch.float32),
    ],
)
def test_folded_decode_and_prefill_match_reference(lens, heads, kv_heads, head_dim, block_size, dtype):
    case = make_dynamic_case(sum(lens), lens, heads, kv_heads, head_dim, block_size, dtype)
    out = paged_attention_int8_dynamic(**case)
    assert out.dtype == dtype and out.shape == case["query"].shape
    exact = paged_attention_int8_dynamic_reference(**{**case, "query": case["query"].double()})
    assert rel_err(out, exact) <= TOLERANCE[dtype]

    g = torch.Generator().manual_seed(7)
    q_lens = [min(n, 3 + i) for i, n in enumerate(lens)]
    query = torch.randn(sum(q_lens), heads, head_dim, generator=g).to(dtype)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    args = {**case, "query": query, "query_start_loc": starts}
    out = paged_prefill_attention_int8_dynamic(**args)
    exact = paged_prefill_attention_int8_dynamic_reference(**{**args, "query": query.double()})
    assert rel_err(out, exact) <= TOLERANCE[dtype]


@pytest.mark.parametrize(
    "name, index, factor",
    [("v_scale_cache", 0, 0.5), ("v_scale_cache", 1, 3.0), ("k_scale_cache", 0, 2.0), ("k_scale_cache", 1, -2.0)],
)
def test_scales_and_offsets_are_read_per_token(name, index, factor):
    """Changing one token's scale or offset changes the output the way dequantizing says: a path that ignored
    the per-token scales or offsets, or read another token's, would miss it."""
    case = make_dynamic_case(3, [40], 4, 2, 64, 16, torch.float32)
    before = paged_attention_int8_dynamic(**case)
    block = int(case["block_tables"][0, 1])
    case[name][block, 3, :, index] = case[name][block, 3, :, index] * factor + (5.0 if index else 0.0)
    exact = paged_attention_int8_dynamic_reference(**{**case, "query": case["query"].double()})
    assert rel_err(before, exact) > 1e-4  # the change is visible
    assert rel_err(paged_attention_int8_dynamic(**case), exact) <= 1e-5


def test_write_then_attend_is_attention_over_the_fake_quantized_keys_and_values():
    """End to end: tokens written through block tables, then decode attention = SDPA over
    ``fake_quant_dynamic(K)`` and ``fake_quant_dynamic(V)`` (what the accuracy path computes)."""
    torch.manual_seed(1)
    kv_heads, heads, head_dim, block_size = 2, 4, 64, 16
    lens = [40, 7, 70]
    tables = BlockTables(BlockAllocator(16), block_size)
    key_cache, value_cache = allocate_kv_cache(16, block_size, kv_heads, head_dim)
    k_scales, v_scales = allocate_kv_scale_cache(16, block_size, kv_heads)
    keys = [torch.randn(n, kv_heads, head_dim) * (1 + 5 * torch.rand(n, 1, 1)) for n in lens]
    values = [torch.randn(n, kv_heads, head_dim) for n in lens]
    for step in range(0, 70, 10):  # interleaved appends: blocks out of order
        for s, n in enumerate(lens):
            if step < n:
                m = min(10, n - step)
                reshape_and_cache_int8_dynamic(
                    keys[s][step : step + m],
                    values[s][step : step + m],
                    key_cache,
                    value_cache,
                    tables.append_tokens(s, m),
                    k_scales,
                    v_scales,
                )
    block_tables, context_lens = tables.tensors([0, 1, 2])
    query = torch.randn(3, heads, head_dim)
    out = paged_attention_int8_dynamic(
        query, key_cache, value_cache, block_tables, context_lens, k_scales, v_scales, 1 / math.sqrt(head_dim)
    )
    for s in range(3):
        k = fake_quant_dynamic(keys[s]).repeat_interleave(2, dim=1).transpose(0, 1)
        v = fake_quant_dynamic(values[s]).repeat_interleave(2, dim=1).transpose(0, 1)
        expected = torch.nn.functional.scaled_dot_product_attention(query[s][:, None], k, v)[:, 0]
        assert (out[s] - expected).abs().max() < 1e-5


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(k_scale_cache=a["k_scale_cache"].half()), "k_scale_cache is torch.float16"),
        (
            lambda a: a.update(v_scale_cache=a["v_scale_cache"][:, :, :1].contiguous()),
            "v_scale_cache is .* \\(4, 16, 1, 2\\)",
        ),
        (
            lambda a: a.update(v_scale_cache=a["v_scale_cache"][..., 0].contiguous()),
            "v_scale_cache is .* \\(4, 16, 2\\)",
        ),
        (
            lambda a: a.update(k_scale_cache=a["k_scale_cache"].transpose(-1, -2).contiguous().transpose(-1, -2)),
            "each pair contiguous",
        ),
        (lambda a: a.update(key_cache=a["key_cache"].float()), "int8 caches"),
    ],
)
def test_write_rejects_bad_scale_caches(change, message):
    key_cache, value_cache = allocate_kv_cache(4, 16, 2, 64)
    k_scales, v_scales = allocate_kv_scale_cache(4, 16, 2)
    args = dict(
        key=torch.randn(3, 2, 64),
        value=torch.randn(3, 2, 64),
        key_cache=key_cache,
        value_cache=value_cache,
        slot_mapping=torch.tensor([0, 5, 17]),
        k_scale_cache=k_scales,
        v_scale_cache=v_scales,
    )
    change(args)
    with pytest.raises(QpassError, match=message):
        reshape_and_cache_int8_dynamic(**args)


def test_attention_rejects_per_channel_shaped_scales():
    case = make_dynamic_case(4, [20], 4, 2, 64, 16, torch.float32)
    case["k_scale_cache"] = torch.ones(2, 64)
    with pytest.raises(QpassError, match="k_scale_cache is torch.float32 \\(2, 64\\)"):
        paged_attention_int8_dynamic(**case)


def test_write_and_prefill_export_as_cache_mutations():
    class Step(torch.nn.Module):
        def forward(self, key, value, query, key_cache, value_cache, k_scales, v_scales, slots, tables, lens, starts):
            reshape_and_cache_int8_dynamic(key, value, key_cache, value_cache, slots, k_scales, v_scales)
            return paged_prefill_attention_int8_dynamic(
                query, key_cache, value_cache, tables, lens, starts, k_scales, v_scales, 0.125
            )

    def inputs():
        g = torch.Generator().manual_seed(0)
        return (
            torch.randn(3, 2, 64, generator=g),
            torch.randn(3, 2, 64, generator=g),
            torch.randn(3, 4, 64, generator=g),
            *allocate_kv_cache(4, 16, 2, 64),
            *allocate_kv_scale_cache(4, 16, 2),
            torch.tensor([16, 17, 18]),
            torch.tensor([[1, 2]], dtype=torch.int32),
            torch.tensor([3], dtype=torch.int32),
            torch.tensor([0, 3], dtype=torch.int32),
        )

    ep = torch.export.export(Step(), inputs())
    assert any("reshape_and_cache_int8_dynamic" in str(n.target) for n in ep.graph.nodes)
    eager, exported = inputs(), inputs()
    expected = Step()(*eager)
    assert torch.equal(ep.module()(*exported), expected)
    assert all(torch.equal(a, b) for a, b in zip(eager[3:7], exported[3:7])) and exported[5].abs().sum() > 0
