"""Triton paged decode attention over an int8 KV cache (the CUDA backend of the qpass ops).

Split-K ("flash-decoding"): the first kernel runs one program per (query row, kv head,
partition of ``PARTITION_TOKENS`` keys) and handles all query heads of that kv group, so one long
sequence still fills the GPU; a second kernel merges the partitions with their log-sum-exp.
With one partition the first kernel writes the output itself.

int8 K/V are never dequantized: the per-channel K scale is folded into Q (the K offset term is
constant per query and cancels in softmax) and the V scale and offset are applied once to the
merged output. With ``KV_DYNAMIC`` (the dynamic cache: a scale and an offset per token and kv head
beside the codes, ``[num_blocks, block_size, kv_heads, 2]``) a key's score is
``scale * (q . code - offset * sum(q))`` and each value's scale multiplies its softmax weight, the
offset term ``sum_j p_j scale_j offset_j`` coming off the output. The same source with neither is a float16/bfloat16
paged kernel of the same design, used as the baseline in ``tools/bench_attention.py``.

Setting ``TRITON_INTERPRET=1`` before this module is imported runs the kernels in Triton's
interpreter, which accepts CPU tensors (that is how the tests check them without a GPU).
"""

import math
import os

import torch
import triton
import triton.language as tl

from qpass.core.errors import QpassError

HEAD_DIMS = (64, 128, 256)
BLOCK_SIZES = (16, 32, 64, 128)
MAX_GROUP = 64  # query heads per kv head
TILE_TOKENS = 64  # keys per inner step
PARTITION_TOKENS = 512  # keys per program; a multiple of TILE_TOKENS
REDUCE_CHUNK = 16  # partitions merged per step of the reduce kernel
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _partition_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    k_scale_ptr,
    v_scale_ptr,
    v_offset_ptr,
    k_token_scale_ptr,
    v_token_scale_ptr,
    out_ptr,
    part_out_ptr,
    part_max_ptr,
    part_sum_ptr,
    qk_scale,  # softmax_scale * log2(e): scores are kept in base 2
    stride_q_row,
    stride_q_head,
    stride_k_block,
    stride_k_token,
    stride_k_head,
    stride_k_dim,  # 1 for token-major keys; block_size for channel-major ones (qpass's vLLM pages)
    stride_v_block,
    stride_v_token,
    stride_v_head,
    stride_s_block,  # of the dynamic cache's (scale, offset) pairs, each pair contiguous
    stride_s_token,
    stride_s_head,
    stride_bt_row,
    stride_o_row,
    stride_o_head,
    num_partitions,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    PARTITION: tl.constexpr,
    KV_INT8: tl.constexpr,
    KV_DYNAMIC: tl.constexpr,
    DIRECT: tl.constexpr,
    OPERAND_TY: tl.constexpr,
    DOT_TY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP

    context_len = tl.load(context_lens_ptr + row)
    start = part * PARTITION
    end = tl.minimum(start + PARTITION, context_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_t = tl.arange(0, TILE)
    heads = kv_head * GROUP + offs_g
    head_mask = offs_g < GROUP

    q = tl.load(
        q_ptr + row * stride_q_row + heads[:, None] * stride_q_head + offs_d[None, :],
        mask=head_mask[:, None],
        other=0.0,
    ).to(tl.float32)
    if KV_INT8:
        q = q * tl.load(k_scale_ptr + kv_head * HEAD_DIM + offs_d)[None, :]  # fold the K scale into Q
    q = (q * qk_scale).to(OPERAND_TY).to(DOT_TY)
    if KV_DYNAMIC:
        q_sum = tl.sum(q.to(tl.float32), 1)  # [GROUP_PAD]: the offset's share of each score, per key offset

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    table_row = block_tables_ptr + row.to(tl.int64) * stride_bt_row
    for tile_start in range(start, end, TILE):
        tokens = tile_start + offs_t
        token_mask = tokens < end
        block = tl.load(table_row + tokens // BLOCK_SIZE, mask=token_mask, other=0).to(tl.int64)
        slot = tokens % BLOCK_SIZE
        k_off = block * stride_k_block + slot * stride_k_token + kv_head * stride_k_head
        k_ptrs = k_off[:, None] + offs_d[None, :] * stride_k_dim
        v_ptrs = (block * stride_v_block + slot * stride_v_token + kv_head * stride_v_head)[:, None] + offs_d[None, :]
        k = tl.load(k_cache_ptr + k_ptrs, mask=token_mask[:, None], other=0).to(DOT_TY)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [GROUP_PAD, TILE]
        if KV_DYNAMIC:  # a key's score: scale * (q . code - offset * sum(q))
            s_ptrs = block * stride_s_block + slot * stride_s_token + kv_head * stride_s_head
            k_s = tl.load(k_token_scale_ptr + s_ptrs, mask=token_mask, other=0.0)
            k_o = tl.load(k_token_scale_ptr + s_ptrs + 1, mask=token_mask, other=0.0)
            scores = (scores - q_sum[:, None] * k_o[None, :]) * k_s[None, :]
        scores = tl.where(token_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + v_ptrs, mask=token_mask[:, None], other=0).to(DOT_TY)
        if (
            KV_DYNAMIC
        ):  # each value's scale weights its p, relative to the tile's largest (p * scale underflows float16)
            v_s = tl.load(v_token_scale_ptr + s_ptrs, mask=token_mask, other=0.0)
            v_max = tl.max(v_s, 0)  # > 0: a tile holds at least one token, and scales are positive
            v_o = tl.load(v_token_scale_ptr + s_ptrs + 1, mask=token_mask, other=0.0)
            w = (p * (v_s / v_max)[None, :]).to(OPERAND_TY)  # the values' offsets come off with the same rounded w
            pv = (
                tl.dot(w.to(DOT_TY), v, input_precision=DOT_PRECISION)
                - tl.sum(w.to(tl.float32) * v_o[None, :], 1)[:, None]
            ) * v_max
        else:
            pv = tl.dot(p.to(OPERAND_TY).to(DOT_TY), v, input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if DIRECT:
        out = acc / l_i[:, None]
        if KV_INT8:  # fold V's scale and offset into the output: sum_j p_j = 1
            v_offset = tl.load(v_offset_ptr + kv_head * HEAD_DIM + offs_d)
            v_scale = tl.load(v_scale_ptr + kv_head * HEAD_DIM + offs_d)
            out = (out - v_offset[None, :]) * v_scale[None, :]
        tl.store(
            out_ptr + row * stride_o_row + heads[:, None] * stride_o_head + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=head_mask[:, None],
        )
    else:
        keep = head_mask & (offs_g * 0 + start < context_len)  # an empty partition writes nothing
        part_idx = (row.to(tl.int64) * num_heads + heads) * num_partitions + part
        tl.store(part_max_ptr + part_idx, m_i, mask=keep)
        tl.store(part_sum_ptr + part_idx, l_i, mask=keep)
        denom = tl.where(l_i > 0, l_i, 1.0)  # 0 only in an empty partition, whose store is masked
        tl.store(
            part_out_ptr + part_idx[:, None] * HEAD_DIM + offs_d[None, :], acc / denom[:, None], mask=keep[:, None]
        )


@triton.jit
def _reduce_kernel(
    out_ptr,
    part_out_ptr,
    part_max_ptr,
    part_sum_ptr,
    context_lens_ptr,
    v_scale_ptr,
    v_offset_ptr,
    stride_o_row,
    stride_o_head,
    num_partitions,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PARTITION: tl.constexpr,
    PART_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    KV_INT8: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    used = tl.cdiv(tl.load(context_lens_ptr + row), PARTITION)
    base = (row.to(tl.int64) * num_heads + head) * num_partitions

    offs_p = tl.arange(0, PART_PAD)
    m = tl.max(tl.load(part_max_ptr + base + offs_p, mask=offs_p < used, other=float("-inf")), 0)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    total = tl.zeros([CHUNK], tl.float32)
    for chunk_start in range(0, used, CHUNK):
        parts = chunk_start + offs_c
        mask = parts < used
        weight = tl.load(part_sum_ptr + base + parts, mask=mask, other=0.0) * tl.exp2(
            tl.load(part_max_ptr + base + parts, mask=mask, other=float("-inf")) - m
        )
        out = tl.load(
            part_out_ptr + (base + parts)[:, None] * HEAD_DIM + offs_d[None, :], mask=mask[:, None], other=0.0
        )
        acc += tl.sum(weight[:, None] * out, 0)
        total += weight
    out = acc / tl.sum(total, 0)
    if KV_INT8:
        kv_head = head // GROUP
        v_offset = tl.load(v_offset_ptr + kv_head * HEAD_DIM + offs_d)
        out = (out - v_offset) * tl.load(v_scale_ptr + kv_head * HEAD_DIM + offs_d)
    tl.store(out_ptr + row * stride_o_row + head * stride_o_head + offs_d, out.to(out_ptr.dtype.element_ty))


def _dot_types(out_dtype):
    """Dot operands are rounded to ``OPERAND_TY`` (the output's dtype) and multiplied as ``DOT_TY``.

    They are the same except under the interpreter, whose bfloat16 ``tl.dot`` returns garbage
    (Triton 3.9): there bfloat16-rounded operands are multiplied in float32, which gives what a
    bfloat16 MMA with float32 accumulation gives.
    """
    operand = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[out_dtype]
    dot = tl.float32 if INTERPRET and operand == tl.bfloat16 else operand
    return {"OPERAND_TY": operand, "DOT_TY": dot, "DOT_PRECISION": "ieee" if dot == tl.float32 else "tf32"}


def _check(query, key_cache, value_cache, block_tables, context_lens, scales, out_dtype, token_scales=None):
    """Shapes, dtypes and layouts the kernels support; raises :class:`QpassError`. Reads no data."""
    kv_int8 = key_cache.dtype == torch.int8 and token_scales is None
    if query.dim() != 3 or query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise QpassError(
            f"query is {query.dtype} {tuple(query.shape)}; it must be float [num_rows, num_heads, head_dim]"
        )
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise QpassError(f"out_dtype={out_dtype}; it must be float16, bfloat16 or float32")
    if key_cache.dtype not in (torch.int8, torch.float16, torch.bfloat16) or value_cache.dtype != key_cache.dtype:
        raise QpassError(
            f"key_cache/value_cache are {key_cache.dtype}/{value_cache.dtype}; both int8 (or both float16/bfloat16)"
        )
    if key_cache.dim() != 4 or value_cache.shape != key_cache.shape:
        raise QpassError(
            "key_cache and value_cache must both be [num_blocks, block_size, num_kv_heads, head_dim] with one shape"
        )
    num_rows, num_heads, head_dim = query.shape
    _, block_size, kv_heads, cache_head_dim = key_cache.shape
    if head_dim not in HEAD_DIMS or cache_head_dim != head_dim:
        raise QpassError(
            f"head_dim {head_dim} (cache {cache_head_dim}); the Triton kernel supports {HEAD_DIMS}, equal in both"
        )
    if block_size not in BLOCK_SIZES:
        raise QpassError(f"block_size={block_size}; the Triton kernel supports {BLOCK_SIZES}")
    if num_heads % kv_heads or num_heads // kv_heads > MAX_GROUP:
        raise QpassError(
            f"num_heads={num_heads}, num_kv_heads={kv_heads}: num_heads must be a multiple of "
            f"num_kv_heads, at most {MAX_GROUP} times it"
        )
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != num_rows:
        raise QpassError(
            f"block_tables is {block_tables.dtype} {tuple(block_tables.shape)}; it must be int32 "
            f"[num_rows={num_rows}, max_blocks_per_seq]"
        )
    if context_lens.dtype != torch.int32 or context_lens.shape != (num_rows,):
        raise QpassError(
            f"context_lens is {context_lens.dtype} {tuple(context_lens.shape)}; it must be int32 [{num_rows}]"
        )
    if kv_int8:
        for name, t in scales.items():
            if t is None or t.dtype != torch.float32 or t.shape != (kv_heads, head_dim):
                raise QpassError(
                    f"{name} must be float32 [num_kv_heads={kv_heads}, head_dim={head_dim}] for an int8 cache"
                )
    if token_scales is not None:
        if (
            key_cache.dtype != torch.int8
            or any(
                t is None or t.dtype != torch.float32 or t.stride(-1) != 1 or t.shape != (*key_cache.shape[:3], 2)
                for t in token_scales
            )
            or token_scales[0].stride() != token_scales[1].stride()
        ):
            raise QpassError(
                f"the dynamic cache needs int8 caches and both k_scale_cache and v_scale_cache, float32 "
                f"[num_blocks, block_size, num_kv_heads={kv_heads}, 2] (scale, offset) with one layout and each "
                "pair contiguous"
            )
        scales = dict(zip(("k_scale_cache", "v_scale_cache"), token_scales))
    if query.stride(-1) != 1 or value_cache.stride(-1) != 1 or block_tables.stride(-1) != 1:
        raise QpassError("query, value_cache and block_tables need a contiguous last dimension; call .contiguous()")
    tensors = [query, key_cache, value_cache, block_tables, context_lens]
    tensors += [t for t in scales.values() if t is not None]
    if not INTERPRET and any(not t.is_cuda for t in tensors):
        raise QpassError("the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before import, for testing)")
    if len({t.device for t in tensors}) != 1:
        raise QpassError("all tensors must be on one device")


def paged_attention_triton(
    query,
    key_cache,
    value_cache,
    block_tables,
    context_lens,
    k_scale=None,
    k_offset=None,
    v_scale=None,
    v_offset=None,
    *,
    softmax_scale,
    out_dtype=None,
    max_context_len=None,
    k_scale_cache=None,
    v_scale_cache=None,
):
    """Launch the split-K paged decode kernels.

    query: ``[num_rows, num_heads, head_dim]`` float16/bfloat16/float32.
    key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, int8 (then
    k_scale, v_scale, v_offset float32 ``[num_kv_heads, head_dim]`` are used; k_offset is accepted
    and not needed, softmax cancels it) or float16/bfloat16 (the baseline; scales ignored). The dynamic
    cache passes ``k_scale_cache`` and ``v_scale_cache`` (float32 ``[num_blocks, block_size, num_kv_heads, 2]``,
    scale and offset, ``x ~= (code - offset) * scale``) instead of the per-channel parameters.
    block_tables: int32 ``[num_rows, max_blocks_per_seq]``; context_lens: int32 ``[num_rows]``.
    max_context_len: an upper bound of context_lens (default ``max_blocks_per_seq * block_size``,
    which needs no device sync) that sizes the partition grid.
    Returns ``[num_rows, num_heads, head_dim]`` in ``out_dtype`` (default: the query's dtype).
    Context lengths are not read here; the qpass op checks them before calling this.
    """
    out_dtype = out_dtype or query.dtype
    scales = {"k_scale": k_scale, "v_scale": v_scale, "v_offset": v_offset}
    dynamic = k_scale_cache is not None or v_scale_cache is not None
    token_scales = (k_scale_cache, v_scale_cache) if dynamic else None
    _check(query, key_cache, value_cache, block_tables, context_lens, scales, out_dtype, token_scales)
    num_rows, num_heads, head_dim = query.shape
    _, block_size, kv_heads, _ = key_cache.shape
    group = num_heads // kv_heads
    out = torch.empty(query.shape, dtype=out_dtype, device=query.device)
    if num_rows == 0:
        return out
    max_context_len = max_context_len or block_tables.shape[1] * block_size
    num_partitions = triton.cdiv(max_context_len, PARTITION_TOKENS)
    direct = num_partitions == 1
    if direct:
        part_out = part_max = part_sum = out  # unused
    else:
        part_max = torch.empty((num_rows, num_heads, num_partitions), dtype=torch.float32, device=query.device)
        part_sum = torch.empty_like(part_max)
        part_out = torch.empty(
            (num_rows, num_heads, num_partitions, head_dim), dtype=torch.float32, device=query.device
        )
    kv_int8 = key_cache.dtype == torch.int8 and not dynamic  # per-channel scales folded into Q and the output
    if not kv_int8:
        k_scale = v_scale = v_offset = out  # unused pointers
    if not dynamic:
        k_scale_cache = v_scale_cache = out
    _partition_kernel[(num_rows, kv_heads, num_partitions)](
        query,
        key_cache,
        value_cache,
        block_tables,
        context_lens,
        k_scale,
        v_scale,
        v_offset,
        k_scale_cache,
        v_scale_cache,
        out,
        part_out,
        part_max,
        part_sum,
        softmax_scale * math.log2(math.e),
        query.stride(0),
        query.stride(1),
        *key_cache.stride(),
        *value_cache.stride()[:3],
        *(k_scale_cache.stride()[:3] if dynamic else (0, 0, 0)),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        num_partitions,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        TILE=TILE_TOKENS,
        PARTITION=PARTITION_TOKENS,
        KV_INT8=kv_int8,
        KV_DYNAMIC=dynamic,
        DIRECT=direct,
        **_dot_types(out_dtype),
    )
    if not direct:
        _reduce_kernel[(num_rows, num_heads)](
            out,
            part_out,
            part_max,
            part_sum,
            context_lens,
            v_scale,
            v_offset,
            out.stride(0),
            out.stride(1),
            num_partitions,
            GROUP=group,
            HEAD_DIM=head_dim,
            PARTITION=PARTITION_TOKENS,
            PART_PAD=triton.next_power_of_2(num_partitions),
            CHUNK=REDUCE_CHUNK,
            KV_INT8=kv_int8,
        )
    return out
