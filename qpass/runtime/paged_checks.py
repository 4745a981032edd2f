"""Argument checks of the paged int8 attention ops: shapes and dtypes (which the fake implementations run
too, so a traced program is refused as early as an eager call), and the data checks of the paging tensors."""

import torch

from qpass.core.errors import QpassError

HEAD_DIMS = (64, 128, 256)
BLOCK_SIZES = (16, 32, 64, 128)
MAX_CONTEXT_LEN = 128 * 1024
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_int8_caches(key_cache, value_cache, fix: str) -> None:
    """Both caches int8 ``[num_blocks, block_size, num_kv_heads, head_dim]`` and of one shape; ``fix`` says how
    to get int8 caches."""
    if key_cache.dtype != torch.int8 or value_cache.dtype != torch.int8:
        raise QpassError(f"key_cache/value_cache are {key_cache.dtype}/{value_cache.dtype}; {fix}")
    if key_cache.dim() != 4 or value_cache.shape != key_cache.shape:
        raise QpassError(
            f"key_cache {tuple(key_cache.shape)} / value_cache {tuple(value_cache.shape)}: both must be "
            "[num_blocks, block_size, num_kv_heads, head_dim] and equal"
        )


def check_scale_caches(key_cache, k_scale_cache, v_scale_cache) -> None:
    """The dynamic cache's scales and offsets: float32 ``[num_blocks, block_size, num_kv_heads, 2]`` each, every pair
    contiguous (``allocate_kv_scale_cache``, or views into a cache that vLLM lays out), one pair per token and kv
    head of ``key_cache``, on its device."""
    want = (*key_cache.shape[:3], 2)
    for name, t in (("k_scale_cache", k_scale_cache), ("v_scale_cache", v_scale_cache)):
        if t.dtype != torch.float32 or tuple(t.shape) != want or t.stride(-1) != 1:
            raise QpassError(
                f"{name} is {t.dtype} {tuple(t.shape)}; the dynamic cache's scales must be float32 "
                f"[num_blocks, block_size, num_kv_heads, 2] = {list(want)}, each pair contiguous "
                "(allocate_kv_scale_cache)"
            )
        if t.device != key_cache.device:
            raise QpassError(f"{name} is on {t.device} but the cache on {key_cache.device}; put them on one device")


def check_cache_args(num_heads, head_dim, key_cache, value_cache, block_tables, context_lens, scales):
    """Check the paged cache, its tables and the C8 parameters against ``num_heads``/``head_dim``.

    key_cache, value_cache: int8 ``[num_blocks, block_size, num_kv_heads, head_dim]``.
    block_tables: int32 ``[num_seqs, max_blocks_per_seq]``; context_lens: int32 ``[num_seqs]``.
    scales: ``{"k_scale": t, ...}``, each float32 ``[num_kv_heads, head_dim]``.
    """
    check_int8_caches(
        key_cache, value_cache, "int8 paged attention needs int8 caches written by reshape_and_cache_int8"
    )
    _, block_size, kv_heads, cache_head_dim = key_cache.shape
    if cache_head_dim != head_dim:
        raise QpassError(f"query head_dim {head_dim} != cache head_dim {cache_head_dim}; they must match")
    if head_dim not in HEAD_DIMS:
        raise QpassError(f"head_dim={head_dim} is not supported; supported head_dim: {HEAD_DIMS}")
    if block_size not in BLOCK_SIZES:
        raise QpassError(f"block_size={block_size} is not supported; supported block sizes: {BLOCK_SIZES}")
    if num_heads % kv_heads:
        raise QpassError(
            f"num_heads={num_heads} is not a multiple of num_kv_heads={kv_heads}; GQA needs "
            "num_heads = group * num_kv_heads"
        )
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2:
        raise QpassError(
            f"block_tables is {block_tables.dtype} {tuple(block_tables.shape)}; it must be int32 "
            "[num_seqs, max_blocks_per_seq]"
        )
    if context_lens.dtype != torch.int32 or context_lens.shape != (block_tables.shape[0],):
        raise QpassError(
            f"context_lens is {context_lens.dtype} {tuple(context_lens.shape)}; it must be int32 "
            f"[num_seqs={block_tables.shape[0]}]"
        )
    for name, t in scales.items():
        if t.dtype != torch.float32 or t.shape != (kv_heads, head_dim):
            raise QpassError(
                f"{name} is {t.dtype} {tuple(t.shape)}; it must be float32 [num_kv_heads={kv_heads}, "
                f"head_dim={head_dim}]"
            )
    tensors = [key_cache, value_cache, block_tables, context_lens, *scales.values()]
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise QpassError(f"tensors are on several devices {sorted(map(str, devices))}; put them on one")


def check_query(query, num_seqs, name="query", num_rows_name="num_seqs"):
    """``query`` must be float ``[num_rows, num_heads, head_dim]`` with ``num_rows == num_seqs``."""
    if query.dtype not in FLOAT_DTYPES:
        raise QpassError(f"{name} is {query.dtype}; it must be one of {FLOAT_DTYPES}")
    if query.dim() != 3 or (num_seqs is not None and query.shape[0] != num_seqs):
        raise QpassError(
            f"{name} has shape {tuple(query.shape)}; it must be [{num_rows_name}"
            f"{'' if num_seqs is None else '=' + str(num_seqs)}, num_heads, head_dim]"
        )


def check_context_lens(context_lens, block_tables, block_size, num_blocks):
    """Data checks: every context length in ``[1, MAX_CONTEXT_LEN]``, covered by its block table
    row, whose used entries are valid block ids. Reads the tensors (a device sync on GPU)."""
    if context_lens.numel() == 0:
        return
    lens = context_lens.tolist()
    for i, n in enumerate(lens):
        if not 1 <= n <= MAX_CONTEXT_LEN:
            raise QpassError(
                f"context_lens[{i}] = {n}; context lengths must be in [1, {MAX_CONTEXT_LEN}] "
                "(drop empty sequences from the batch)"
            )
        if n > block_tables.shape[1] * block_size:
            raise QpassError(
                f"context_lens[{i}] = {n} needs {-(-n // block_size)} blocks of {block_size} but "
                f"block_tables has {block_tables.shape[1]} columns; widen block_tables"
            )
    needed = (context_lens.long() + block_size - 1) // block_size
    used = torch.arange(block_tables.shape[1], device=block_tables.device)[None, :] < needed[:, None]
    bad = used & ((block_tables < 0) | (block_tables >= num_blocks))
    if bool(bad.any()):
        seq, col = (int(x) for x in bad.nonzero()[0])
        raise QpassError(
            f"block_tables[{seq}, {col}] = {int(block_tables[seq, col])} is not a block of a cache with "
            f"{num_blocks} blocks; fill block_tables from the cache's block allocator"
        )


def check_query_start_loc_layout(query_start_loc, num_seqs, device) -> None:
    """``query_start_loc`` int32 ``[num_seqs + 1]`` on ``device`` (the cache's): the prefill ops' shape check,
    which their fake implementations run too."""
    if query_start_loc.dtype != torch.int32 or query_start_loc.shape != (num_seqs + 1,):
        raise QpassError(
            f"query_start_loc is {query_start_loc.dtype} {tuple(query_start_loc.shape)}; it must be int32 "
            f"[num_seqs + 1 = {num_seqs + 1}]"
        )
    if query_start_loc.device != device:
        raise QpassError(
            f"query_start_loc is on {query_start_loc.device} but the cache on {device}; put them on one device"
        )


def check_query_start_loc(query_start_loc, num_tokens, context_lens):
    """``query_start_loc`` int32 ``[num_seqs + 1]``: 0, cumulative query lengths, ``num_tokens``;
    each sequence's query length at most its context length. Reads the tensors."""
    check_query_start_loc_layout(query_start_loc, context_lens.shape[0], context_lens.device)
    starts = query_start_loc.tolist()
    if starts[0] != 0 or starts[-1] != num_tokens or any(b < a for a, b in zip(starts, starts[1:])):
        raise QpassError(
            f"query_start_loc = {starts} must start at 0, never decrease and end at num_tokens={num_tokens}"
        )
    for i, (q_len, n) in enumerate(zip((b - a for a, b in zip(starts, starts[1:])), context_lens.tolist())):
        if q_len > n:
            raise QpassError(
                f"sequence {i} has {q_len} query tokens but context_lens[{i}] = {n}; the queries are the "
                "last tokens of the context, so context_lens must count them"
            )


def check_decode(query, key_cache, value_cache, block_tables, context_lens, k_scale, k_offset, v_scale, v_offset):
    check_query(query, block_tables.shape[0] if block_tables.dim() == 2 else None)
    scales = {"k_scale": k_scale, "k_offset": k_offset, "v_scale": v_scale, "v_offset": v_offset}
    check_cache_args(query.shape[1], query.shape[2], key_cache, value_cache, block_tables, context_lens, scales)
    if query.device != key_cache.device:
        raise QpassError(f"query is on {query.device} but the cache on {key_cache.device}; put them on one device")
