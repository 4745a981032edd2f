"""Paged KV cache: block allocator, block tables, and the int8 write op (qpass::reshape_and_cache_int8)."""

import math

import pytest
import torch

from qpass.core.errors import QpassError
from qpass.runtime import (
    BlockAllocator,
    BlockTables,
    allocate_kv_cache,
    dequantize_int8,
    paged_attention_int8,
    reshape_and_cache_int8,
)


def c8_params(x):
    """Asymmetric per-channel int8 parameters of ``x`` ``[tokens, kv_heads, head_dim]`` (DESIGN.md)."""
    lo = x.amin(dim=0).clamp(max=0)
    hi = x.amax(dim=0).clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=1e-8)
    offset = torch.round(-lo / scale) - 128
    return scale.float(), offset.float()


def test_allocator_hands_out_every_block_once_and_reports_exhaustion():
    alloc = BlockAllocator(3)
    blocks = [alloc.allocate() for _ in range(3)]
    assert sorted(blocks) == [0, 1, 2] and alloc.num_free == 0
    with pytest.raises(QpassError, match="out of blocks"):
        alloc.allocate()
    alloc.free([blocks[1]])
    assert alloc.allocate() == blocks[1]
    with pytest.raises(QpassError, match="not an allocated block"):
        alloc.free([7])


def test_double_free_is_refused():
    alloc = BlockAllocator(2)
    b = alloc.allocate()
    alloc.free([b])
    with pytest.raises(QpassError, match="free each block once"):
        alloc.free([b])


def test_block_tables_slots_padding_and_free():
    tables = BlockTables(BlockAllocator(8), block_size=4)
    slots_a = tables.append_tokens(0, 5)  # blocks 0, 1
    slots_b = tables.append_tokens(1, 2)  # block 2
    slots_a2 = tables.append_tokens(0, 4)  # fills block 1, takes block 3: a hole between a's blocks
    assert tables.blocks(0) == [0, 1, 3] and tables.blocks(1) == [2]
    assert slots_a.tolist() == [0, 1, 2, 3, 4]
    assert slots_b.tolist() == [8, 9]
    assert slots_a2.tolist() == [5, 6, 7, 12]
    assert slots_a.dtype == torch.int64
    block_tables, context_lens = tables.tensors([1, 0])
    assert block_tables.dtype == torch.int32 and context_lens.dtype == torch.int32
    assert block_tables.tolist() == [[2, 0, 0], [0, 1, 3]]
    assert context_lens.tolist() == [2, 9]
    tables.free(0)
    assert tables.allocator.num_free == 7
    with pytest.raises(QpassError, match="needs 8 more blocks"):
        tables.append_tokens(2, 30)


def test_write_round_trip_within_half_a_step_and_skips_minus_one():
    torch.manual_seed(0)
    kv_heads, head_dim, block_size = 2, 64, 16
    key_cache, value_cache = allocate_kv_cache(6, block_size, kv_heads, head_dim)
    key_cache.fill_(55)
    value_cache.fill_(55)
    key = torch.randn(20, kv_heads, head_dim) * 3 + 1
    value = torch.randn(20, kv_heads, head_dim)
    k_scale, k_offset = c8_params(key)
    v_scale, v_offset = c8_params(value)
    tables = BlockTables(BlockAllocator(6), block_size)
    tables.append_tokens(9, 3)  # another sequence takes block 0
    slots = tables.append_tokens(0, 20)
    slots[[4, 11]] = -1
    reshape_and_cache_int8(key, value, key_cache, value_cache, slots, k_scale, k_offset, v_scale, v_offset)

    written = slots >= 0
    flat_k = key_cache.view(-1, kv_heads, head_dim)[slots[written]]
    flat_v = value_cache.view(-1, kv_heads, head_dim)[slots[written]]
    k_back = dequantize_int8(flat_k, k_scale, k_offset, torch.float32)
    v_back = dequantize_int8(flat_v, v_scale, v_offset, torch.float32)
    assert ((k_back - key[written]).abs() <= k_scale / 2 * (1 + 1e-4)).all()
    assert ((v_back - value[written]).abs() <= v_scale / 2 * (1 + 1e-4)).all()
    untouched = torch.ones(key_cache.shape[0] * block_size, dtype=torch.bool)
    untouched[slots[written]] = False
    assert (key_cache.view(-1, kv_heads, head_dim)[untouched] == 55).all()
    assert (value_cache.view(-1, kv_heads, head_dim)[untouched] == 55).all()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(slot_mapping=a["slot_mapping"].int()), "slot_mapping is torch.int32"),
        (lambda a: a.update(slot_mapping=a["slot_mapping"] + 1000), "has 64 slots"),
        (lambda a: a.update(k_scale=a["k_scale"].reshape(-1)), "k_scale is torch.float32 \\(128,\\)"),
        (lambda a: a.update(key=a["key"][:, :1]), "do not match the cache"),
        (lambda a: a.update(key_cache=a["key_cache"].float()), "int8 caches"),
    ],
)
def test_write_rejects_bad_arguments(change, message):
    key_cache, value_cache = allocate_kv_cache(4, 16, 2, 64)
    args = dict(
        key=torch.randn(3, 2, 64),
        value=torch.randn(3, 2, 64),
        key_cache=key_cache,
        value_cache=value_cache,
        slot_mapping=torch.tensor([0, 5, 17]),
        k_scale=torch.ones(2, 64),
        k_offset=torch.zeros(2, 64),
        v_scale=torch.ones(2, 64),
        v_offset=torch.zeros(2, 64),
    )
    change(args)
    with pytest.raises(QpassError, match=message):
        reshape_and_cache_int8(**args)


def test_write_op_exports_as_a_cache_mutation():
    class Write(torch.nn.Module):
        def forward(self, key, value, key_cache, value_cache, slots, k_scale, k_offset, v_scale, v_offset):
            reshape_and_cache_int8(key, value, key_cache, value_cache, slots, k_scale, k_offset, v_scale, v_offset)
            return key_cache.sum()

    key_cache, value_cache = allocate_kv_cache(4, 16, 2, 64)
    args = (
        torch.randn(3, 2, 64),
        torch.randn(3, 2, 64),
        key_cache,
        value_cache,
        torch.tensor([0, 5, 17]),
        torch.full((2, 64), 0.05),
        torch.zeros(2, 64),
        torch.full((2, 64), 0.05),
        torch.zeros(2, 64),
    )
    ep = torch.export.export(Write(), args)
    targets = {str(n.target) for n in ep.graph.nodes}
    assert any("reshape_and_cache_int8" in t for t in targets)
    fresh_k, fresh_v = allocate_kv_cache(4, 16, 2, 64)
    ep.module()(args[0], args[1], fresh_k, fresh_v, *args[4:])
    Write()(*args)
    assert torch.equal(fresh_k, key_cache) and torch.equal(fresh_v, value_cache)
    assert fresh_k.abs().sum() > 0


def test_write_then_attend_matches_float_attention():
    """End to end: tokens written through block tables, then decode attention ~ float attention."""
    torch.manual_seed(1)
    kv_heads, heads, head_dim, block_size = 2, 4, 64, 16
    lens = [40, 7, 70]
    tables = BlockTables(BlockAllocator(16), block_size)
    key_cache, value_cache = allocate_kv_cache(16, block_size, kv_heads, head_dim)
    keys = [torch.randn(n, kv_heads, head_dim) for n in lens]
    values = [torch.randn(n, kv_heads, head_dim) for n in lens]
    k_scale, k_offset = c8_params(torch.cat(keys))
    v_scale, v_offset = c8_params(torch.cat(values))
    for step in range(0, 70, 10):  # interleave the sequences' appends: blocks out of order, with holes
        for s, n in enumerate(lens):
            if step < n:
                m = min(10, n - step)
                slots = tables.append_tokens(s, m)
                reshape_and_cache_int8(
                    keys[s][step : step + m],
                    values[s][step : step + m],
                    key_cache,
                    value_cache,
                    slots,
                    k_scale,
                    k_offset,
                    v_scale,
                    v_offset,
                )
    block_tables, context_lens = tables.tensors([0, 1, 2])
    query = torch.randn(3, heads, head_dim)
    out = paged_attention_int8(
        query,
        key_cache,
        value_cache,
        block_tables,
        context_lens,
        k_scale,
        k_offset,
        v_scale,
        v_offset,
        1 / math.sqrt(head_dim),
    )
    for s in range(3):
        k = keys[s].repeat_interleave(2, dim=1).transpose(0, 1)
        v = values[s].repeat_interleave(2, dim=1).transpose(0, 1)
        expected = torch.nn.functional.scaled_dot_product_attention(query[s][:, None], k, v)[:, 0]
        assert torch.allclose(out[s], expected, atol=3e-2), (out[s] - expected).abs().max()
