"""Fused int8 paged attention ops (decode, prefill) registered with torch.library, with their
dequantizing references (the ground truth) and the folded PyTorch path (the CPU backend). The FAQuant
variant is in ``paged_attention_faquant.py``, the dynamic cache's (a scale per token and kv head) in
``paged_attention_dynamic.py``, the argument checks in ``paged_checks.py``.

The backend follows the query's device: ``cpu`` runs the folded PyTorch path below, ``cuda`` the
Triton kernel (``triton_paged_attention.py``), ``npu`` the torch_npu lowering (``ascend.py``,
not run on Ascend hardware).

Folding, so that no dequantized copy of the cache is made, with ``k ~= (kq - k_offset) * k_scale``
and ``v ~= (vq - v_offset) * v_scale`` per channel:

- ``q . k = sum_d (q_d * k_scale_d) * kq_d - sum_d q_d * k_scale_d * k_offset_d``; the second
  term is the same for every key, so softmax cancels it and only ``q * k_scale`` is needed;
- ``sum_j p_j v_j = (sum_j p_j vq_j - v_offset) * v_scale`` because ``sum_j p_j = 1``.
"""

import torch

from qpass.core.errors import QpassError
from qpass.runtime import cpu_kernel
from qpass.runtime.paged_checks import (
    check_cache_args,
    check_context_lens,
    check_decode,
    check_query,
    check_query_start_loc,
    check_query_start_loc_layout,
)
from qpass.runtime.quant_ops import dequantize_int8

# Keys the folded PyTorch path handles at once; bounds its memory at long contexts.
CHUNK_TOKENS = 2048


# ---------------------------------------------------------------------------------------------
# Helpers shared by the references and the folded path
# ---------------------------------------------------------------------------------------------


def gather_tokens(cache, table_row, start, end):
    """Tokens ``start .. end - 1`` of one sequence, ``[end - start, num_kv_heads, head_dim]``, still int8;
    reads only the blocks that hold them."""
    block_size = cache.shape[1]
    first, last = start // block_size, -(-end // block_size)
    blocks = cache[table_row[first:last].long()].flatten(0, 1)
    return blocks[start - first * block_size : end - first * block_size]


def prefill_rows(block_tables, context_lens, query_start_loc):
    """Turn a prefill batch into one decode row per query token.

    Token ``j`` of sequence ``i`` (``q_len`` query tokens, context ``n``) sits at position
    ``n - q_len + j`` and, causally, sees the first ``n - q_len + j + 1`` keys.
    Returns ``row_block_tables`` int32 ``[num_tokens, max_blocks_per_seq]`` and
    ``row_context_lens`` int32 ``[num_tokens]``.
    """
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    num_tokens = int(query_start_loc[-1])
    seq = torch.repeat_interleave(torch.arange(q_lens.shape[0], device=q_lens.device), q_lens)
    pos_in_query = torch.arange(num_tokens, device=q_lens.device) - query_start_loc[:-1].long()[seq]
    row_lens = context_lens.long()[seq] - q_lens[seq] + pos_in_query + 1
    return block_tables[seq], row_lens.to(torch.int32)


def causal_sdpa(q, k, v, softmax_scale, q_positions):
    """Plain attention for one sequence: q ``[q_len, num_heads, head_dim]``, k/v
    ``[context_len, num_kv_heads, head_dim]``, query ``i`` sees keys ``0 .. q_positions[i]``."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * softmax_scale
    future = torch.arange(k.shape[0], device=q.device)[None, :] > q_positions[:, None]
    probs = scores.masked_fill(future[None], float("-inf")).softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def folded_attention(
    q,
    key_cache,
    value_cache,
    table_row,
    context_len,
    q_positions,
    k_scale,
    k_offset,
    v_scale,
    v_offset,
    softmax_scale,
    token_scales=None,
):
    """Folded int8 attention for one sequence, chunk by chunk with an online softmax.

    q: float32 ``[q_len, num_heads, head_dim]``; query ``i`` sees keys ``0 .. q_positions[i]``.
    Returns float32 ``[q_len, num_heads, head_dim]``. Only ``CHUNK_TOKENS`` keys are held in
    float at a time, and they are the int8 codes, never dequantized. ``token_scales``: the dynamic
    cache's ``(k_scale_cache, v_scale_cache)`` ``[num_blocks, block_size, num_kv_heads, 2]`` (scale, offset) in
    place of the per-channel parameters (then None): a key's score is ``scale * (q . code - offset * sum(q))``
    (its offset term differs from key to key, so softmax does not cancel it), and a value's scale multiplies
    its weight, its offset term ``sum_j p_j scale_j offset_j`` taken off the output.
    """
    q_len, num_heads, head_dim = q.shape
    kv_heads = key_cache.shape[2]
    group = num_heads // kv_heads
    rows = q.view(q_len, kv_heads, group, head_dim).permute(1, 0, 2, 3).reshape(kv_heads, q_len * group, head_dim)
    if token_scales is None:
        rows = rows * (k_scale * softmax_scale)[:, None, :]  # fold the K scale into Q
    else:
        rows = rows * softmax_scale
    row_pos = q_positions.repeat_interleave(group)  # [q_len * group], rows ordered (token, head in group)
    m = torch.full(rows.shape[:2], float("-inf"), device=q.device)
    denom = torch.zeros(rows.shape[:2], device=q.device)
    acc = torch.zeros_like(rows)
    chunk = CHUNK_TOKENS - CHUNK_TOKENS % key_cache.shape[1]
    for start in range(0, context_len, chunk):
        end = min(context_len, start + chunk)
        kq = gather_tokens(key_cache, table_row, start, end).permute(1, 2, 0).float()  # [kv_heads, D, n]
        vq = gather_tokens(value_cache, table_row, start, end).permute(1, 0, 2).float()  # [kv_heads, n, D]
        scores = rows @ kq  # static K offset term left out: constant per row, cancelled by softmax
        if token_scales is not None:  # [kv_heads, 1, n] each
            (k_scales, k_offsets), (v_scales, v_offsets) = (
                gather_tokens(t, table_row, start, end).permute(2, 1, 0)[:, :, None, :] for t in token_scales
            )
            scores = (scores - rows.sum(-1, keepdim=True) * k_offsets) * k_scales
        future = torch.arange(start, end, device=q.device)[None, :] > row_pos[:, None]
        scores.masked_fill_(future[None], float("-inf"))
        m_new = torch.maximum(m, scores.amax(dim=-1))
        alpha = torch.exp(m - m_new)
        p = torch.exp(scores - m_new[..., None])
        denom = denom * alpha + p.sum(dim=-1)
        if token_scales is None:
            acc = acc * alpha[..., None] + p @ vq
        else:
            pv = p * v_scales
            acc = acc * alpha[..., None] + pv @ vq - (pv * v_offsets).sum(-1, keepdim=True)
        m = m_new
    if token_scales is None:
        out = (acc / denom[..., None] - v_offset[:, None, :]) * v_scale[:, None, :]  # fold V scale and offset
    else:
        out = acc / denom[..., None]
    return out.view(kv_heads, q_len, group, head_dim).permute(1, 0, 2, 3).reshape(q_len, num_heads, head_dim)


def folded_paged(
    query, key_cache, value_cache, block_tables, context_lens, query_start_loc, softmax_scale, scales, token_scales=None
):
    """The CPU backend of every paged op, in the query's dtype. Where the C++ kernel (:mod:`qpass.runtime.cpu_kernel`)
    is built, the whole batch is one call of it, each query token a decode row with its causal context (as the CUDA
    path runs it); where it is not, :func:`folded_attention` runs one request at a time. ``scales``: the static
    cache's ``(k_scale, k_offset, v_scale, v_offset)``, or None with the dynamic cache's ``token_scales``."""
    if cpu_kernel.available():
        static = None if scales is None else (scales[0], scales[2], scales[3])  # K's offset cancels in the softmax
        if query_start_loc.tolist() != list(range(context_lens.shape[0] + 1)):  # not one query token per request
            block_tables, context_lens = prefill_rows(block_tables, context_lens, query_start_loc)
        args = (key_cache, value_cache, block_tables, context_lens, softmax_scale, static, token_scales)
        return cpu_kernel.paged_decode(query, *args)
    out = torch.empty_like(query)
    starts, lens = query_start_loc.tolist(), context_lens.tolist()
    params = scales if scales is not None else (None,) * 4
    for i, n in enumerate(lens):
        a, b = starts[i], starts[i + 1]
        if a == b:
            continue
        pos = torch.arange(n - (b - a), n, device=query.device)
        out[a:b] = folded_attention(
            query[a:b].float(), key_cache, value_cache, block_tables[i], n, pos, *params, softmax_scale, token_scales
        ).to(query.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------


def paged_attention_int8_reference(
    query, key_cache, value_cache, block_tables, context_lens, k_scale, k_offset, v_scale, v_offset, softmax_scale
):
    """Ground truth for :func:`paged_attention_int8`: gathers and dequantizes each sequence, float64."""
    out = torch.empty(query.shape, dtype=torch.float64, device=query.device)
    for i, n in enumerate(context_lens.tolist()):
        k = dequantize_int8(gather_tokens(key_cache, block_tables[i], 0, n), k_scale, k_offset, torch.float64)
        v = dequantize_int8(gather_tokens(value_cache, block_tables[i], 0, n), v_scale, v_offset, torch.float64)
        out[i] = causal_sdpa(
            query[i : i + 1].double(), k, v, softmax_scale, torch.tensor([n - 1], device=query.device)
        )[0]
    return out.to(query.dtype)


def paged_attention_int8_torch(
    query, key_cache, value_cache, block_tables, context_lens, k_scale, k_offset, v_scale, v_offset, softmax_scale
):
    """The CPU decode path: same contract as :func:`paged_attention_int8`."""
    starts = torch.arange(query.shape[0] + 1, dtype=torch.int32)
    scales = (k_scale, k_offset, v_scale, v_offset)
    return folded_paged(query, key_cache, value_cache, block_tables, context_lens, starts, softmax_scale, scales)


@torch.library.custom_op("qpass::paged_attention_int8", mutates_args=())
def paged_attention_int8(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    k_scale: torch.Tensor,
    k_offset: torch.Tensor,
    v_scale: torch.Tensor,
    v_offset: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """Decode attention of one query token per sequence over a paged int8 KV cache.

    query: ``[num_seqs, num_heads, head_dim]`` float16/bfloat16/float32.
    key_cache, value_cache: int8 ``[num_blocks, block_size, num_kv_heads, head_dim]``.
    block_tables: int32 ``[num_seqs, max_blocks_per_seq]``; context_lens: int32 ``[num_seqs]``.
    k_scale, k_offset, v_scale, v_offset: float32 ``[num_kv_heads, head_dim]``.
    Returns ``[num_seqs, num_heads, head_dim]`` in the query's dtype. head_dim 64/128/256,
    block_size 16/32/64/128, context lengths 1 .. 128k, num_heads a multiple of num_kv_heads.
    """
    check_decode(query, key_cache, value_cache, block_tables, context_lens, k_scale, k_offset, v_scale, v_offset)
    check_context_lens(context_lens, block_tables, key_cache.shape[1], key_cache.shape[0])
    args = (query, key_cache, value_cache, block_tables, context_lens, k_scale, k_offset, v_scale, v_offset)
    if query.device.type == "cuda":
        from qpass.runtime.triton_paged_attention import paged_attention_triton

        return paged_attention_triton(*args, softmax_scale=softmax_scale)
    if query.device.type == "npu":
        import torch_npu

        from qpass.runtime import ascend

        return ascend.paged_attention_int8(torch_npu, *args, softmax_scale)
    return paged_attention_int8_torch(*args, softmax_scale)


@paged_attention_int8.register_fake
def _(query, key_cache, value_cache, block_tables, context_lens, k_scale, k_offset, v_scale, v_offset, softmax_scale):
    check_decode(query, key_cache, value_cache, block_tables, context_lens, k_scale, k_offset, v_scale, v_offset)
    return torch.empty_like(query)


# ---------------------------------------------------------------------------------------------
# Prefill: many query tokens per sequence, causal, the queries being the last context tokens
# ---------------------------------------------------------------------------------------------


def paged_prefill_attention_int8_reference(
    query,
    key_cache,
    value_cache,
    block_tables,
    context_lens,
    query_start_loc,
    k_scale,
    k_offset,
    v_scale,
    v_offset,
    softmax_scale,
):
    """Ground truth for :func:`paged_prefill_attention_int8`: dequantizes each sequence, float64."""
    out = torch.empty(query.shape, dtype=torch.float64, device=query.device)
    starts = query_start_loc.tolist()
    for i, n in enumerate(context_lens.tolist()):
        a, b = starts[i], starts[i + 1]
        k = dequantize_int8(gather_tokens(key_cache, block_tables[i], 0, n), k_scale, k_offset, torch.float64)
        v = dequantize_int8(gather_tokens(value_cache, block_tables[i], 0, n), v_scale, v_offset, torch.float64)
        pos = torch.arange(n - (b - a), n, device=query.device)
        out[a:b] = causal_sdpa(query[a:b].double(), k, v, softmax_scale, pos)
    return out.to(query.dtype)


def paged_prefill_attention_int8_torch(
    query,
    key_cache,
    value_cache,
    block_tables,
    context_lens,
    query_start_loc,
    k_scale,
    k_offset,
    v_scale,
    v_offset,
    softmax_scale,
):
    """The CPU prefill path."""
    scales = (k_scale, k_offset, v_scale, v_offset)
    return folded_paged(
        query, key_cache, value_cache, block_tables, context_lens, query_start_loc, softmax_scale, scales
    )


def _check_prefill(
    query, key_cache, value_cache, block_tables, context_lens, query_start_loc, k_scale, k_offset, v_scale, v_offset
):
    check_query(query, None, num_rows_name="num_tokens")
    scales = {"k_scale": k_scale, "k_offset": k_offset, "v_scale": v_scale, "v_offset": v_offset}
    check_cache_args(query.shape[1], query.shape[2], key_cache, value_cache, block_tables, context_lens, scales)
    check_query_start_loc_layout(query_start_loc, block_tables.shape[0], key_cache.device)
    if query.device != key_cache.device:
        raise QpassError(f"query is on {query.device} but the cache on {key_cache.device}; put them on one device")


@torch.library.custom_op("qpass::paged_prefill_attention_int8", mutates_args=())
def paged_prefill_attention_int8(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    k_scale: torch.Tensor,
    k_offset: torch.Tensor,
    v_scale: torch.Tensor,
    v_offset: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """Causal prefill attention over a paged int8 KV cache (the new tokens' K/V already written).

    query: ``[num_tokens, num_heads, head_dim]``, the sequences' query tokens back to back.
    query_start_loc: int32 ``[num_seqs + 1]``; sequence ``i`` owns query rows
    ``query_start_loc[i] .. query_start_loc[i + 1] - 1``, which are the last tokens of its context
    of ``context_lens[i]`` tokens. Other arguments as :func:`paged_attention_int8`.
    Returns ``[num_tokens, num_heads, head_dim]`` in the query's dtype.
    """
    _check_prefill(
        query, key_cache, value_cache, block_tables, context_lens, query_start_loc, k_scale, k_offset, v_scale, v_offset
    )
    check_context_lens(context_lens, block_tables, key_cache.shape[1], key_cache.shape[0])
    check_query_start_loc(query_start_loc, query.shape[0], context_lens)
    scales = (k_scale, k_offset, v_scale, v_offset)
    if query.device.type in ("cuda", "npu"):
        # One decode row per query token, each with its causal context length.
        row_tables, row_lens = prefill_rows(block_tables, context_lens, query_start_loc)
        return paged_attention_int8(query, key_cache, value_cache, row_tables, row_lens, *scales, softmax_scale)
    return paged_prefill_attention_int8_torch(
        query, key_cache, value_cache, block_tables, context_lens, query_start_loc, *scales, softmax_scale
    )


@paged_prefill_attention_int8.register_fake
def _(
    query,
    key_cache,
    value_cache,
    block_tables,
    context_lens,
    query_start_loc,
    k_scale,
    k_offset,
    v_scale,
    v_offset,
    softmax_scale,
):
    _check_prefill(
        query, key_cache, value_cache, block_tables, context_lens, query_start_loc, k_scale, k_offset, v_scale, v_offset
    )
    return torch.empty_like(query)
