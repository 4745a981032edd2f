"""Paged int8 KV cache: the cache tensors, a block allocator, per-sequence block tables, and the
write ops that quantize new K/V and scatter them into their slots: C8 (static, per channel) and the
dynamic cache (an asymmetric scale and offset per token and kv head, computed as it is written).

Layout, as in vLLM and MindIE: ``key_cache`` and ``value_cache`` are int8
``[num_blocks, block_size, kv_heads, head_dim]``; the dynamic cache's scales and offsets sit beside them in
``k_scale_cache`` and ``v_scale_cache``, float32 ``[num_blocks, block_size, kv_heads, 2]`` (``[..., 0]`` the
scale, ``[..., 1]`` the offset, ``x ~= (code - offset) * scale``). Token ``i`` of a
sequence lives in slot ``block_table[i // block_size] * block_size + i % block_size``.
"""

import torch

from qpass.core.errors import QpassError
from qpass.core.int8 import quantize_dynamic
from qpass.runtime.paged_checks import check_int8_caches, check_scale_caches
from qpass.runtime.quant_ops import quantize_int8


def allocate_kv_cache(
    num_blocks: int, block_size: int, kv_heads: int, head_dim: int, device="cpu", dtype=torch.int8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed ``(key_cache, value_cache)``, each ``[num_blocks, block_size, kv_heads, head_dim]``."""
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)


def allocate_kv_scale_cache(
    num_blocks: int, block_size: int, kv_heads: int, device="cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed ``(k_scale_cache, v_scale_cache)`` of the dynamic cache, each float32
    ``[num_blocks, block_size, kv_heads, 2]`` (scale, offset)."""
    shape = (num_blocks, block_size, kv_heads, 2)
    return torch.zeros(shape, dtype=torch.float32, device=device), torch.zeros(
        shape, dtype=torch.float32, device=device
    )


class BlockAllocator:
    """Hands out cache block ids ``0 .. num_blocks - 1`` and takes them back."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise QpassError(f"num_blocks={num_blocks}: a cache needs at least one block")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out the lowest id first
        self._in_use: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise QpassError(
                f"the KV cache is out of blocks (all {self.num_blocks} in use); free finished "
                "sequences or allocate the cache with more blocks"
            )
        block = self._free.pop()
        self._in_use.add(block)
        return block

    def free(self, blocks) -> None:
        for block in blocks:
            if block not in self._in_use:
                raise QpassError(f"block {block} is not an allocated block of this cache; free each block once")
            self._in_use.remove(block)
            self._free.append(block)


class BlockTables:
    """Per-sequence lists of cache blocks over one :class:`BlockAllocator`.

    ``append_tokens`` grows a sequence and returns the slots its new tokens go to (the
    ``slot_mapping`` for :func:`reshape_and_cache_int8`); ``tensors`` gives the ``block_tables``
    and ``context_lens`` that paged attention reads.
    """

    def __init__(self, allocator: BlockAllocator, block_size: int):
        self.allocator = allocator
        self.block_size = block_size
        self._blocks: dict[int, list[int]] = {}
        self._lens: dict[int, int] = {}

    def append_tokens(self, seq_id: int, num_tokens: int) -> torch.Tensor:
        """Reserve room for ``num_tokens`` more tokens of ``seq_id``; int64 slots ``[num_tokens]``."""
        blocks = self._blocks.setdefault(seq_id, [])
        start = self._lens.get(seq_id, 0)
        end = start + num_tokens
        needed = -(-end // self.block_size) - len(blocks)
        if needed > self.allocator.num_free:
            raise QpassError(
                f"sequence {seq_id} needs {needed} more blocks for {num_tokens} tokens but the KV "
                f"cache has {self.allocator.num_free} free; free finished sequences or allocate "
                "the cache with more blocks"
            )
        blocks.extend(self.allocator.allocate() for _ in range(needed))
        self._lens[seq_id] = end
        positions = torch.arange(start, end)
        table = torch.tensor(blocks, dtype=torch.int64)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def free(self, seq_id: int) -> None:
        """Give the blocks of ``seq_id`` back to the allocator."""
        self.allocator.free(self._blocks.pop(seq_id))
        del self._lens[seq_id]

    def blocks(self, seq_id: int) -> list[int]:
        return list(self._blocks[seq_id])

    def tensors(self, seq_ids, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``block_tables`` int32 ``[num_seqs, max_blocks_per_seq]`` (padded with 0, never read
        past a sequence's length) and ``context_lens`` int32 ``[num_seqs]``, in ``seq_ids`` order."""
        width = max(1, max(len(self._blocks[s]) for s in seq_ids))
        rows = [self._blocks[s] + [0] * (width - len(self._blocks[s])) for s in seq_ids]
        block_tables = torch.tensor(rows, dtype=torch.int32, device=device)
        context_lens = torch.tensor([self._lens[s] for s in seq_ids], dtype=torch.int32, device=device)
        return block_tables, context_lens


def check_cache_write_args(key, value, key_cache, value_cache, slot_mapping, k_scale, k_offset, v_scale, v_offset):
    """Shape and dtype checks of :func:`reshape_and_cache_int8`, raising :class:`QpassError`."""
    _check_write(key, value, key_cache, value_cache, slot_mapping)
    kv_heads, head_dim = key_cache.shape[2:]
    for name, t in (("k_scale", k_scale), ("k_offset", k_offset), ("v_scale", v_scale), ("v_offset", v_offset)):
        if t.shape != (kv_heads, head_dim) or t.dtype != torch.float32:
            raise QpassError(
                f"{name} is {t.dtype} {tuple(t.shape)}; C8 parameters must be float32 [kv_heads={kv_heads}, "
                f"head_dim={head_dim}] (reshape a flat [kv_heads * head_dim] tensor)"
            )


def _check_write(key, value, key_cache, value_cache, slot_mapping):
    """What both write ops need: int8 caches, K/V ``[num_tokens, kv_heads, head_dim]`` float, int64 slots."""
    check_int8_caches(
        key_cache, value_cache, "the int8 write op needs int8 caches (allocate_kv_cache(..., dtype=torch.int8))"
    )
    kv_heads, head_dim = key_cache.shape[2:]
    if key.dim() != 3 or key.shape[1:] != (kv_heads, head_dim) or value.shape != key.shape:
        raise QpassError(
            f"key {tuple(key.shape)} / value {tuple(value.shape)} do not match the cache: both must be "
            f"[num_tokens, {kv_heads}, {head_dim}]"
        )
    if not key.is_floating_point() or not value.is_floating_point():
        raise QpassError(f"key/value are {key.dtype}/{value.dtype}; pass float K/V, the op quantizes them")
    if slot_mapping.dtype != torch.int64 or slot_mapping.shape != (key.shape[0],):
        raise QpassError(
            f"slot_mapping is {slot_mapping.dtype} {tuple(slot_mapping.shape)}; it must be int64 "
            f"[num_tokens={key.shape[0]}] (slot = block * block_size + offset, -1 to skip)"
        )


def _check_slots(slot_mapping, key_cache) -> int:
    """The cache's number of slots, refusing a ``slot_mapping`` that points past it (reads the tensor)."""
    num_slots = key_cache.shape[0] * key_cache.shape[1]
    if slot_mapping.numel() and int(slot_mapping.max()) >= num_slots:
        raise QpassError(
            f"slot_mapping holds slot {int(slot_mapping.max())} but the cache has {num_slots} slots "
            "(num_blocks * block_size); build slot_mapping from this cache's block tables"
        )
    return num_slots


@torch.library.custom_op("qpass::reshape_and_cache_int8", mutates_args=("key_cache", "value_cache"))
def reshape_and_cache_int8(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor,
    k_offset: torch.Tensor,
    v_scale: torch.Tensor,
    v_offset: torch.Tensor,
) -> None:
    """Quantize new K/V and write them into the paged int8 cache, in place.

    key, value: float ``[num_tokens, kv_heads, head_dim]``.
    key_cache, value_cache: int8 ``[num_blocks, block_size, kv_heads, head_dim]`` (mutated).
    slot_mapping: int64 ``[num_tokens]``, ``block * block_size + offset``; ``-1`` skips the token.
    k_scale, k_offset, v_scale, v_offset: float32 ``[kv_heads, head_dim]`` (C8, per channel),
    ``q = clamp(round(x / scale) + offset, -128, 127)``.
    """
    check_cache_write_args(key, value, key_cache, value_cache, slot_mapping, k_scale, k_offset, v_scale, v_offset)
    _check_slots(slot_mapping, key_cache)
    if key.device.type == "npu":
        import torch_npu

        from qpass.runtime import ascend

        ascend.reshape_and_cache_int8(
            torch_npu, key, value, key_cache, value_cache, slot_mapping, k_scale, k_offset, v_scale, v_offset
        )
        return
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    key_q = quantize_int8(key[keep], k_scale, k_offset)
    value_q = quantize_int8(value[keep], v_scale, v_offset)
    blocks, offsets = slots // key_cache.shape[1], slots % key_cache.shape[1]  # any strides: vLLM's are not dense
    key_cache[blocks, offsets] = key_q
    value_cache[blocks, offsets] = value_q


@reshape_and_cache_int8.register_fake
def _(key, value, key_cache, value_cache, slot_mapping, k_scale, k_offset, v_scale, v_offset):
    check_cache_write_args(key, value, key_cache, value_cache, slot_mapping, k_scale, k_offset, v_scale, v_offset)


def _check_dynamic_write(key, value, key_cache, value_cache, slot_mapping, k_scale_cache, v_scale_cache):
    _check_write(key, value, key_cache, value_cache, slot_mapping)
    check_scale_caches(key_cache, k_scale_cache, v_scale_cache)


@torch.library.custom_op(
    "qpass::reshape_and_cache_int8_dynamic", mutates_args=("key_cache", "value_cache", "k_scale_cache", "v_scale_cache")
)
def reshape_and_cache_int8_dynamic(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale_cache: torch.Tensor,
    v_scale_cache: torch.Tensor,
) -> None:
    """Quantize new K/V per token and kv head and write codes and scales into the dynamic cache, in place.

    key, value: float ``[num_tokens, kv_heads, head_dim]``; each ``[head_dim]`` row gets the asymmetric
    ``scale = (max - min) / 255`` and ``offset`` of its min and max, and ``q = round(x / scale) + offset``
    (:func:`qpass.core.int8.quantize_dynamic`).
    key_cache, value_cache: int8 ``[num_blocks, block_size, kv_heads, head_dim]`` (mutated).
    slot_mapping: int64 ``[num_tokens]``, ``block * block_size + offset``; ``-1`` skips the token.
    k_scale_cache, v_scale_cache: float32 ``[num_blocks, block_size, kv_heads, 2]``, scale and offset (mutated).
    Plain PyTorch on every device (no torch_npu kernel for this form).
    """
    _check_dynamic_write(key, value, key_cache, value_cache, slot_mapping, k_scale_cache, v_scale_cache)
    _check_slots(slot_mapping, key_cache)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // key_cache.shape[1], slots % key_cache.shape[1]  # any strides: vLLM's are not dense
    for x, cache, scales in ((key, key_cache, k_scale_cache), (value, value_cache, v_scale_cache)):
        codes, scale, offset = quantize_dynamic(x[keep])
        cache[blocks, offsets] = codes
        scales[blocks, offsets] = torch.cat([scale, offset], dim=-1)


@reshape_and_cache_int8_dynamic.register_fake
def _(key, value, key_cache, value_cache, slot_mapping, k_scale_cache, v_scale_cache):
    _check_dynamic_write(key, value, key_cache, value_cache, slot_mapping, k_scale_cache, v_scale_cache)
