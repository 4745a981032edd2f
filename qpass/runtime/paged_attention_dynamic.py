"""Paged attention over the dynamic int8 KV cache (``--kv-int8 dynamic``): int8 codes with an asymmetric
float32 scale and offset per token and kv head beside them (vLLM's ``int8_per_token_head`` granularity, with
min/max instead of absmax), written by :func:`qpass.runtime.paged_cache.reshape_and_cache_int8_dynamic`.

Registered with torch.library as ``qpass::paged_attention_int8_dynamic`` (decode) and
``qpass::paged_prefill_attention_int8_dynamic`` (prefill), each with a dequantizing reference (the ground
truth). The backend follows the query's device: ``cuda`` runs the Triton kernel
(``triton_paged_attention.py``), any other device the folded PyTorch path of ``paged_attention.py``, where a
key's scale and offset act on its score and a value's on its softmax weight, so the cache is never dequantized.
"""

import torch

from qpass.core.errors import QpassError
from qpass.core.int8 import dequantize
from qpass.runtime.paged_attention import causal_sdpa, folded_paged, gather_tokens, prefill_rows
from qpass.runtime.paged_checks import (
    check_cache_args,
    check_context_lens,
    check_query,
    check_query_start_loc,
    check_query_start_loc_layout,
    check_scale_caches,
)


def _dequantized(cache, scale_cache, table_row, n):
    """Tokens ``0 .. n - 1`` of one sequence, float64 ``[n, num_kv_heads, head_dim]``."""
    qparams = gather_tokens(scale_cache, table_row, 0, n)  # [n, num_kv_heads, 2]: scale, offset
    return dequantize(gather_tokens(cache, table_row, 0, n), qparams[..., :1], qparams[..., 1:], torch.float64)


def _check(query, key_cache, value_cache, block_tables, context_lens, k_scale_cache, v_scale_cache):
    check_cache_args(query.shape[1], query.shape[2], key_cache, value_cache, block_tables, context_lens, {})
    check_scale_caches(key_cache, k_scale_cache, v_scale_cache)
    if query.device != key_cache.device:
        raise QpassError(f"query is on {query.device} but the cache on {key_cache.device}; put them on one device")


# ---------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------


def paged_attention_int8_dynamic_reference(
    query, key_cache, value_cache, block_tables, context_lens, k_scale_cache, v_scale_cache, softmax_scale
):
    """Ground truth for :func:`paged_attention_int8_dynamic`: gathers and dequantizes each sequence, float64."""
    out = torch.empty(query.shape, dtype=torch.float64, device=query.device)
    for i, n in enumerate(context_lens.tolist()):
        k = _dequantized(key_cache, k_scale_cache, block_tables[i], n)
        v = _dequantized(value_cache, v_scale_cache, block_tables[i], n)
        out[i] = causal_sdpa(
            query[i : i + 1].double(), k, v, softmax_scale, torch.tensor([n - 1], device=query.device)
        )[0]
    return out.to(query.dtype)


def paged_attention_int8_dynamic_torch(
    query, key_cache, value_cache, block_tables, context_lens, k_scale_cache, v_scale_cache, softmax_scale
):
    """The CPU decode path: same contract as :func:`paged_attention_int8_dynamic`."""
    starts = torch.arange(query.shape[0] + 1, dtype=torch.int32)
    pairs = (k_scale_cache, v_scale_cache)
    return folded_paged(query, key_cache, value_cache, block_tables, context_lens, starts, softmax_scale, None, pairs)


def _check_decode(query, key_cache, value_cache, block_tables, context_lens, k_scale_cache, v_scale_cache):
    check_query(query, block_tables.shape[0] if block_tables.dim() == 2 else None)
    _check(query, key_cache, value_cache, block_tables, context_lens, k_scale_cache, v_scale_cache)


@torch.library.custom_op("qpass::paged_attention_int8_dynamic", mutates_args=())
def paged_attention_int8_dynamic(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    k_scale_cache: torch.Tensor,
    v_scale_cache: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """Decode attention of one query token per sequence over the dynamic int8 paged cache.

    query: ``[num_seqs, num_heads, head_dim]`` float16/bfloat16/float32.
    key_cache, value_cache: int8 ``[num_blocks, block_size, num_kv_heads, head_dim]``.
    block_tables: int32 ``[num_seqs, max_blocks_per_seq]``; context_lens: int32 ``[num_seqs]``.
    k_scale_cache, v_scale_cache: float32 ``[num_blocks, block_size, num_kv_heads, 2]``, scale and offset,
    ``x ~= (code - offset) * scale``.
    Returns ``[num_seqs, num_heads, head_dim]`` in the query's dtype. Supported shapes as
    :func:`qpass.runtime.paged_attention.paged_attention_int8`.
    """
    _check_decode(query, key_cache, value_cache, block_tables, context_lens, k_scale_cache, v_scale_cache)
    check_context_lens(context_lens, block_tables, key_cache.shape[1], key_cache.shape[0])
    if query.device.type == "cuda":
        from qpass.runtime.triton_paged_attention import paged_attention_triton

        return paged_attention_triton(
            query,
            key_cache,
            value_cache,
            block_tables,
            context_lens,
            softmax_scale=softmax_scale,
            k_scale_cache=k_scale_cache,
            v_scale_cache=v_scale_cache,
        )
    return paged_attention_int8_dynamic_torch(
        query, key_cache, value_cache, block_tables, context_lens, k_scale_cache, v_scale_cache, softmax_scale
    )


@paged_attention_int8_dynamic.register_fake
def _(query, key_cache, value_cache, block_tables, context_lens, k_scale_cache, v_scale_cache, softmax_scale):
    _check_decode(query, key_cache, value_cache, block_tables, context_lens, k_scale_cache, v_scale_cache)
    return torch.empty_like(query)


# ---------------------------------------------------------------------------------------------
# Prefill: many query tokens per sequence, causal, the queries being the last context tokens
# ---------------------------------------------------------------------------------------------


def paged_prefill_attention_int8_dynamic_reference(
    query,
    key_cache,
    value_cache,
    block_tables,
    context_lens,
    query_start_loc,
    k_scale_cache,
    v_scale_cache,
    softmax_scale,
):
    """Ground truth for :func:`paged_prefill_attention_int8_dynamic`: dequantizes each sequence, float64."""
    out = torch.empty(query.shape, dtype=torch.float64, device=query.device)
    starts = query_start_loc.tolist()
    for i, n in enumerate(context_lens.tolist()):
        a, b = starts[i], starts[i + 1]
        k = _dequantized(key_cache, k_scale_cache, block_tables[i], n)
        v = _dequantized(value_cache, v_scale_cache, block_tables[i], n)
        out[a:b] = causal_sdpa(
            query[a:b].double(), k, v, softmax_scale, torch.arange(n - (b - a), n, device=query.device)
        )
    return out.to(query.dtype)


def paged_prefill_attention_int8_dynamic_torch(
    query,
    key_cache,
    value_cache,
    block_tables,
    context_lens,
    query_start_loc,
    k_scale_cache,
    v_scale_cache,
    softmax_scale,
):
    """The CPU prefill path."""
    pairs = (k_scale_cache, v_scale_cache)
    return folded_paged(
        query, key_cache, value_cache, block_tables, context_lens, query_start_loc, softmax_scale, None, pairs
    )


def _check_prefill(
    query, key_cache, value_cache, block_tables, context_lens, query_start_loc, k_scale_cache, v_scale_cache
):
    check_query(query, None, num_rows_name="num_tokens")
    _check(query, key_cache, value_cache, block_tables, context_lens, k_scale_cache, v_scale_cache)
    check_query_start_loc_layout(query_start_loc, block_tables.shape[0], key_cache.device)


@torch.library.custom_op("qpass::paged_prefill_attention_int8_dynamic", mutates_args=())
def paged_prefill_attention_int8_dynamic(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    k_scale_cache: torch.Tensor,
    v_scale_cache: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """Causal prefill attention over the dynamic int8 paged cache (the new tokens' K/V already written).

    query: ``[num_tokens, num_heads, head_dim]``, the sequences' query tokens back to back;
    query_start_loc: int32 ``[num_seqs + 1]`` (as :func:`qpass.runtime.paged_attention.paged_prefill_attention_int8`).
    Other arguments as :func:`paged_attention_int8_dynamic`. Returns ``[num_tokens, num_heads, head_dim]``.
    """
    _check_prefill(
        query, key_cache, value_cache, block_tables, context_lens, query_start_loc, k_scale_cache, v_scale_cache
    )
    check_context_lens(context_lens, block_tables, key_cache.shape[1], key_cache.shape[0])
    check_query_start_loc(query_start_loc, query.shape[0], context_lens)
    if query.device.type == "cuda":
        row_tables, row_lens = prefill_rows(block_tables, context_lens, query_start_loc)
        return paged_attention_int8_dynamic(
            query, key_cache, value_cache, row_tables, row_lens, k_scale_cache, v_scale_cache, softmax_scale
        )
    return paged_prefill_attention_int8_dynamic_torch(
        query,
        key_cache,
        value_cache,
        block_tables,
        context_lens,
        query_start_loc,
        k_scale_cache,
        v_scale_cache,
        softmax_scale,
    )


@paged_prefill_attention_int8_dynamic.register_fake
def _(
    query,
    key_cache,
    value_cache,
    block_tables,
    context_lens,
    query_start_loc,
    k_scale_cache,
    v_scale_cache,
    softmax_scale,
):
    _check_prefill(
        query, key_cache, value_cache, block_tables, context_lens, query_start_loc, k_scale_cache, v_scale_cache
    )
    return torch.empty_like(query)
