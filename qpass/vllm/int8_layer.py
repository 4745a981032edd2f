"""What an attention layer of a qpass model does inside vLLM, in plain PyTorch over qpass's paged int8 ops (no vLLM
import, so that it is tested, the Triton kernel included, without vLLM): write new K/V into vLLM's layer cache and
attend over it. :mod:`qpass.vllm.backend` calls these from vLLM's attention backend interface.

vLLM hands each layer its cache as a ``[num_blocks, kv_heads, block_size, content]`` int8 tensor (layout ``LBHNC``,
:func:`content_bytes` per token and kv head) and moves, shares and frees it only block by block, so the inside of a
block's kv-head run of ``block_size * content`` bytes is qpass's to lay out (:func:`split_cache`): K's codes
channel-major (``[head_dim, block_size]``: 16 slots of one channel are one vector load, which is how the CPU kernel
scores 16 keys at once), then V's codes token-major (``[block_size, head_dim]``: a weight times a whole value row), and
for the dynamic cache K's then V's float32 ``(scale, offset)`` per slot. The ops read and write it through
``[num_blocks, block_size, kv_heads, ...]`` views of the same memory, so a block is still one page that vLLM
allocates, shares between prefixes and frees.
"""

from dataclasses import dataclass

import torch

from qpass.runtime import cpu_kernel
from qpass.runtime.paged_attention import folded_paged, paged_prefill_attention_int8
from qpass.runtime.paged_attention_dynamic import paged_prefill_attention_int8_dynamic
from qpass.runtime.paged_cache import reshape_and_cache_int8, reshape_and_cache_int8_dynamic
from qpass.runtime.quant_ops import dequantize_int8, quantize_int8

PAIR_BYTES = 8  # the dynamic cache's (scale, offset) of one token and kv head: two float32


@dataclass
class Grids:
    """A layer's int8 grids, float32: the cache's ``(scale, offset)`` per kv channel ``[kv_heads, head_dim]`` each
    (None for the dynamic cache, whose pairs are computed per token and kv head as it is written); the query's
    FAQuant round trip ``[heads, head_dim]`` or None; and, with FAQuant and C8 together, C8's round trip on K and V
    before the cache stores them on FAQuant's grid (as qpass's own lowering orders them)."""

    k_cache: tuple[torch.Tensor, torch.Tensor] | None
    v_cache: tuple[torch.Tensor, torch.Tensor] | None
    query: tuple[torch.Tensor, torch.Tensor] | None = None
    k_before: tuple[torch.Tensor, torch.Tensor] | None = None
    v_before: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def dynamic(self) -> bool:
        return self.k_cache is None


def round_trip(x: torch.Tensor, grid: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``x`` ``[tokens, heads, head_dim]`` quantized to int8 on ``grid`` and back, in ``x``'s dtype."""
    return dequantize_int8(quantize_int8(x.float(), *grid), *grid, torch.float32).to(x.dtype)


def content_bytes(head_dim: int, dynamic: bool) -> int:
    """Bytes of one token and kv head in a page: K's and V's codes, and with the dynamic cache each one's pair."""
    return 2 * (head_dim + (PAIR_BYTES if dynamic else 0))


def split_cache(kv_cache: torch.Tensor, dynamic: bool = False):
    """vLLM's ``[num_blocks, kv_heads, block_size, content]`` layer cache as the ops' caches, views of the same memory:
    ``(key_cache, value_cache)`` ``[num_blocks, block_size, kv_heads, head_dim]`` int8 (the key's channels strided by
    ``block_size``, the value's contiguous), and for the dynamic cache ``(k_scale_cache, v_scale_cache)``
    ``[num_blocks, block_size, kv_heads, 2]`` float32 (else None). The module docstring has the layout."""
    blocks, kv_heads, block_size, content = kv_cache.shape
    d = content // 2 - (PAIR_BYTES if dynamic else 0)
    run = kv_cache.view(blocks, kv_heads, block_size * content)  # one block's bytes of one kv head
    codes = block_size * d
    key = run[..., :codes].unflatten(-1, (d, block_size)).permute(0, 3, 1, 2)
    value = run[..., codes : 2 * codes].unflatten(-1, (block_size, d)).transpose(1, 2)
    if not dynamic:
        return (key, value), None
    pair_bytes = block_size * PAIR_BYTES
    pairs = tuple(
        run[..., a : a + pair_bytes].view(torch.float32).unflatten(-1, (block_size, 2)).transpose(1, 2)
        for a in (2 * codes, 2 * codes + pair_bytes)
    )
    return (key, value), pairs


class Views:
    """:func:`split_cache` of a layer's cache, made again only when vLLM hands the layer other memory (the views cost
    more than a decode step's cache write)."""

    def __init__(self, dynamic: bool) -> None:
        self.dynamic, self.memory, self.views = dynamic, None, None

    def __call__(self, kv_cache: torch.Tensor):
        memory = (kv_cache.data_ptr(), kv_cache.shape, kv_cache.stride())
        if memory != self.memory:
            self.memory, self.views = memory, split_cache(kv_cache, self.dynamic)
        return self.views


def write_cache(grids: Grids, key, value, kv_cache, slot_mapping, views=None) -> None:
    """Quantize the batch's new ``key``/``value`` ``[tokens, kv_heads, head_dim]`` into their ``slot_mapping`` slots of
    the layer cache ``kv_cache``: on the cache's grid (C8's round trip first where FAQuant stores them), or per token
    and kv head (the dynamic cache). On CPU with qpass's kernel built, its write op (one call per cache, no Python
    per token); else the runtime's write ops. ``views``: :func:`split_cache` of ``kv_cache``, where the caller keeps
    them (:class:`Views`)."""
    n = slot_mapping.shape[0]
    key, value, slots = key[:n], value[:n], slot_mapping.to(torch.int64)
    (key_cache, value_cache), pairs = views or split_cache(kv_cache, grids.dynamic)
    if grids.k_before is not None:
        key, value = round_trip(key.float(), grids.k_before), round_trip(value.float(), grids.v_before)
    if kv_cache.device.type == "cpu" and cpu_kernel.available():  # reads any float dtype as float32, exactly
        static = None if grids.dynamic else (grids.k_cache, grids.v_cache)
        cpu_kernel.write(key, value, key_cache, value_cache, slots, static, pairs)
        return
    key, value = key.float(), value.float()
    if grids.dynamic:
        reshape_and_cache_int8_dynamic(key, value, key_cache, value_cache, slots, *pairs)
    else:
        reshape_and_cache_int8(key, value, key_cache, value_cache, slots, *grids.k_cache, *grids.v_cache)


def attend(grids: Grids, query, kv_cache, block_table, seq_lens, query_start_loc, softmax_scale: float, views=None):
    """Causal attention of ``query`` ``[tokens, heads, head_dim]`` (requests back to back, ``query_start_loc``) over the
    layer cache: one op for prefills, chunked prefills and decodes; in ``query``'s dtype. On CPU the runtime's CPU
    backend itself (:func:`qpass.runtime.paged_attention.folded_paged`: qpass's kernel where it is built; vLLM's
    metadata needs none of the ops' argument checks); else the runtime's prefill op."""
    q = query if grids.query is None else round_trip(query, grids.query)
    (key_cache, value_cache), pairs = views or split_cache(kv_cache, grids.dynamic)
    tables = (block_table, seq_lens, query_start_loc)
    if query.device.type == "cpu":
        scales = None if grids.dynamic else (*grids.k_cache, *grids.v_cache)
        return folded_paged(q, key_cache, value_cache, *tables, softmax_scale, scales, pairs)
    q = q.float()
    if grids.dynamic:
        out = paged_prefill_attention_int8_dynamic(q, key_cache, value_cache, *tables, *pairs, softmax_scale)
    else:
        out = paged_prefill_attention_int8(
            q, key_cache, value_cache, *tables, *grids.k_cache, *grids.v_cache, softmax_scale
        )
    return out.to(query.dtype)
