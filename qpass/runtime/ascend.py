"""Ascend lowering of the int8 paged-attention ops onto documented torch_npu operators.

NOT RUN ON ASCEND HARDWARE. It is written from torch_npu's public documentation and tested only
against a CPU emulation of those operators (``tests/test_ascend_lowering.py``), built from the
same documentation. Check it on a device before relying on it.

- Cache write: ``torch_npu.npu_quantize`` (``x / scales + zero_points``, rounded and saturated
  to int8) then ``torch_npu.npu_scatter_pa_kv_cache`` (in place, "Norm" layout
  ``[num_blocks, block_size, kv_heads, head_dim]``).
- Decode: ``torch_npu.npu_fused_infer_attention_score`` with ``block_table`` (PageAttention),
  query in ``BNSD`` ``[B, N, 1, D]``, the cache viewed as ``[num_blocks, block_size, kv_heads * head_dim]``,
  and per-channel antiquant (``key_antiquant_mode=0``) parameters ``[1, kv_heads, 1, head_dim]``
  in the query's dtype. Ascend antiquant computes ``(x + offset) * scale``; qpass's convention is
  ``(x - offset) * scale``, so offsets are passed negated.

Every function takes the ``torch_npu`` module as its first argument so that tests can pass an
emulation.
"""

import torch

from qpass.core.errors import QpassError


def _check_block_size(block_size):
    if block_size % 32:
        raise QpassError(
            f"block_size={block_size}: torch_npu paged attention over an int8 cache needs a block_size "
            "that is a multiple of 32 (use 32, 64 or 128 on Ascend)"
        )


def reshape_and_cache_int8(
    torch_npu, key, value, key_cache, value_cache, slot_mapping, k_scale, k_offset, v_scale, v_offset
):
    """Quantize K/V (C8, per channel) with ``npu_quantize`` and scatter them with ``npu_scatter_pa_kv_cache``.

    key, value: float ``[num_tokens, kv_heads, head_dim]``; key_cache, value_cache: int8
    ``[num_blocks, block_size, kv_heads, head_dim]`` (written in place); slot_mapping: int64
    ``[num_tokens]``, -1 skips a token (those tokens are dropped before the scatter, whose
    documentation defines no skip value); scales/offsets float32 ``[kv_heads, head_dim]``.
    """
    _check_block_size(key_cache.shape[1])
    keep = slot_mapping >= 0
    key, value, slots = key[keep], value[keep], slot_mapping[keep]
    num_tokens, kv_heads, head_dim = key.shape

    def quantize(x, scale, offset):
        # npu_quantize quantizes along the last axis only: flatten heads and dims into it.
        zero_points = offset.reshape(-1).round().to(torch.int32)
        q = torch_npu.npu_quantize(
            x.reshape(num_tokens, -1).float(), scale.reshape(-1), zero_points, torch.qint8, -1, True
        )
        return q.view(torch.int8).reshape(num_tokens, kv_heads, head_dim)

    torch_npu.npu_scatter_pa_kv_cache(
        quantize(key, k_scale, k_offset),
        quantize(value, v_scale, v_offset),
        key_cache,
        value_cache,
        slots.to(torch.int32),
    )


def paged_attention_int8(
    torch_npu,
    query,
    key_cache,
    value_cache,
    block_tables,
    context_lens,
    k_scale,
    k_offset,
    v_scale,
    v_offset,
    softmax_scale,
):
    """Decode attention with ``npu_fused_infer_attention_score`` over the paged int8 cache.

    query: float16/bfloat16 ``[num_seqs, num_heads, head_dim]``; the rest as
    :func:`qpass.runtime.paged_attention.paged_attention_int8`. Returns
    ``[num_seqs, num_heads, head_dim]`` in the query's dtype.
    """
    num_blocks, block_size, kv_heads, head_dim = key_cache.shape
    _check_block_size(block_size)
    if query.dtype not in (torch.float16, torch.bfloat16):
        raise QpassError(
            f"query is {query.dtype}; npu_fused_infer_attention_score takes float16 or bfloat16 queries, "
            "cast the query first"
        )

    def antiquant(t):  # per channel, [1, N, 1, D], in the query's dtype (documented for Q_S = 1)
        return t.to(query.dtype).reshape(1, kv_heads, 1, head_dim)

    out, _ = torch_npu.npu_fused_infer_attention_score(
        query.unsqueeze(2),  # BNSD: [num_seqs, num_heads, 1, head_dim]
        key_cache.view(num_blocks, block_size, kv_heads * head_dim),
        value_cache.view(num_blocks, block_size, kv_heads * head_dim),
        block_table=block_tables,
        actual_seq_lengths_kv=context_lens.tolist(),
        num_heads=query.shape[1],
        num_key_value_heads=kv_heads,
        scale=softmax_scale,
        input_layout="BNSD",
        block_size=block_size,
        key_antiquant_scale=antiquant(k_scale),
        key_antiquant_offset=antiquant(-k_offset),  # Ascend: (x + offset) * scale
        value_antiquant_scale=antiquant(v_scale),
        value_antiquant_offset=antiquant(-v_offset),
        key_antiquant_mode=0,
        value_antiquant_mode=0,
    )
    return out.squeeze(2)
