"""FAQuant decode attention over a paged int8 KV cache: an int8 query with per-head, per-dim scale/offset.

Registered with torch.library as ``qpass::paged_attention_int8_faquant``; its reference dequantizes Q,
K and V. The query (one token per sequence, not the cache) is dequantized to float32 and runs the same
folded path as :func:`qpass.runtime.paged_attention.paged_attention_int8`.
"""

import torch

from qpass.core.errors import QpassError
from qpass.runtime.paged_attention import paged_attention_int8_reference, paged_attention_int8_torch
from qpass.runtime.paged_checks import FLOAT_DTYPES, check_cache_args, check_context_lens
from qpass.runtime.quant_ops import dequantize_int8


def _check_faquant(
    query,
    q_scale,
    q_offset,
    key_cache,
    value_cache,
    block_tables,
    context_lens,
    k_scale,
    k_offset,
    v_scale,
    v_offset,
    out_dtype,
):
    if query.dtype != torch.int8 or query.dim() != 3:
        raise QpassError(
            f"query is {query.dtype} {tuple(query.shape)}; FAQuant needs int8 [num_seqs, num_heads, head_dim] "
            "(use paged_attention_int8 for a float query)"
        )
    if out_dtype not in FLOAT_DTYPES:
        raise QpassError(f"out_dtype={out_dtype}; it must be one of {FLOAT_DTYPES}")
    num_heads, head_dim = query.shape[1:]
    for name, t in (("q_scale", q_scale), ("q_offset", q_offset)):
        if t.dtype != torch.float32 or t.shape != (num_heads, head_dim):
            raise QpassError(
                f"{name} is {t.dtype} {tuple(t.shape)}; it must be float32 [num_heads={num_heads}, head_dim={head_dim}]"
            )
    scales = {"k_scale": k_scale, "k_offset": k_offset, "v_scale": v_scale, "v_offset": v_offset}
    check_cache_args(num_heads, head_dim, key_cache, value_cache, block_tables, context_lens, scales)
    if query.shape[0] != block_tables.shape[0]:
        raise QpassError(
            f"query has {query.shape[0]} rows but block_tables {block_tables.shape[0]}; one row per sequence"
        )
    if query.device != key_cache.device:
        raise QpassError(f"query is on {query.device} but the cache on {key_cache.device}; put them on one device")


def paged_attention_int8_faquant_reference(
    query,
    q_scale,
    q_offset,
    key_cache,
    value_cache,
    block_tables,
    context_lens,
    k_scale,
    k_offset,
    v_scale,
    v_offset,
    softmax_scale,
    out_dtype,
):
    """Ground truth for :func:`paged_attention_int8_faquant`: dequantizes Q, K and V, float64."""
    q = dequantize_int8(query, q_scale, q_offset, torch.float64)
    out = paged_attention_int8_reference(
        q, key_cache, value_cache, block_tables, context_lens, k_scale, k_offset, v_scale, v_offset, softmax_scale
    )
    return out.to(out_dtype)


@torch.library.custom_op("qpass::paged_attention_int8_faquant", mutates_args=())
def paged_attention_int8_faquant(
    query: torch.Tensor,
    q_scale: torch.Tensor,
    q_offset: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    k_scale: torch.Tensor,
    k_offset: torch.Tensor,
    v_scale: torch.Tensor,
    v_offset: torch.Tensor,
    softmax_scale: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Decode attention with FAQuant: an int8 query and an int8 paged KV cache.

    query: int8 ``[num_seqs, num_heads, head_dim]``; q_scale, q_offset: float32
    ``[num_heads, head_dim]`` (``q ~= (query - q_offset) * q_scale``). Other arguments as
    :func:`paged_attention_int8`. Returns ``[num_seqs, num_heads, head_dim]`` in ``out_dtype``.
    The query (one token per sequence, not the cache) is dequantized to float32 and then runs the
    same folded path as :func:`paged_attention_int8`, so its scale meets the K scale in one product.
    """
    _check_faquant(
        query,
        q_scale,
        q_offset,
        key_cache,
        value_cache,
        block_tables,
        context_lens,
        k_scale,
        k_offset,
        v_scale,
        v_offset,
        out_dtype,
    )
    check_context_lens(context_lens, block_tables, key_cache.shape[1], key_cache.shape[0])
    q = dequantize_int8(query, q_scale, q_offset, torch.float32)
    args = (key_cache, value_cache, block_tables, context_lens, k_scale, k_offset, v_scale, v_offset)
    if query.device.type == "cuda":
        from qpass.runtime.triton_paged_attention import paged_attention_triton

        return paged_attention_triton(q, *args, softmax_scale=softmax_scale, out_dtype=out_dtype)
    if query.device.type == "npu":
        import torch_npu

        from qpass.runtime import ascend

        return ascend.paged_attention_int8(torch_npu, q.to(out_dtype), *args, softmax_scale)
    return paged_attention_int8_torch(q, *args, softmax_scale).to(out_dtype)


@paged_attention_int8_faquant.register_fake
def _(
    query,
    q_scale,
    q_offset,
    key_cache,
    value_cache,
    block_tables,
    context_lens,
    k_scale,
    k_offset,
    v_scale,
    v_offset,
    softmax_scale,
    out_dtype,
):
    _check_faquant(
        query,
        q_scale,
        q_offset,
        key_cache,
        value_cache,
        block_tables,
        context_lens,
        k_scale,
        k_offset,
        v_scale,
        v_offset,
        out_dtype,
    )
    return query.new_empty(query.shape, dtype=out_dtype)
