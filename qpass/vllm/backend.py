"""The attention backend the plugin puts in place of vLLM's on every layer of a qpass model: the KV cache lives in
vLLM's paged blocks as int8, written by ``qpass::reshape_and_cache_int8`` with the checkpoint's static per-channel
scales and offsets, and attention runs ``qpass::paged_prefill_attention_int8`` (one op for a batch of prefills,
chunked prefills and decodes: vLLM's ``query_start_loc`` is its ``query_start_loc``). The ops choose their
backend by device: the folded PyTorch path on CPU, the Triton kernel on CUDA.

vLLM hands each layer its cache as a ``[num_blocks, kv_heads, block_size, 2 * head_dim]`` int8 view (layout
``LBHNC``, K in the first ``head_dim`` of the last axis, V in the second); the ops read and write it through
``[num_blocks, block_size, kv_heads, head_dim]`` views of the same memory, so a block is still one page that vLLM
allocates, shares between prefixes and frees.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import KVCacheLayout

from qpass.runtime.paged_attention import paged_prefill_attention_int8
from qpass.runtime.paged_cache import reshape_and_cache_int8
from qpass.runtime.paged_checks import BLOCK_SIZES, HEAD_DIMS
from qpass.runtime.quant_ops import dequantize_int8, quantize_int8

NAME = "QPASS_INT8"


class QpassInt8Backend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        return list(BLOCK_SIZES)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(HEAD_DIMS)

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple:
        return (KVCacheLayout.LBHNC,)

    @staticmethod
    def get_name() -> str:
        return NAME

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @staticmethod
    def get_impl_cls() -> type["QpassInt8Impl"]:
        return QpassInt8Impl

    @staticmethod
    def get_builder_cls() -> type["QpassInt8MetadataBuilder"]:
        return QpassInt8MetadataBuilder


@dataclass
class QpassInt8Metadata:
    num_actual_tokens: int  # the batch's tokens, padding excluded
    query_start_loc: torch.Tensor  # int32 [num_reqs + 1]
    seq_lens: torch.Tensor  # int32 [num_reqs]: each request's context, the new tokens included
    block_table: torch.Tensor  # int32 [num_reqs, max_blocks]
    slot_mapping: torch.Tensor  # int64 [num_actual_tokens]


class QpassInt8MetadataBuilder(AttentionMetadataBuilder[QpassInt8Metadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False):
        m = common_attn_metadata
        n = m.num_reqs
        return QpassInt8Metadata(
            num_actual_tokens=m.num_actual_tokens,
            query_start_loc=m.query_start_loc[: n + 1].to(torch.int32),
            seq_lens=m.seq_lens[:n].to(torch.int32),
            block_table=m.block_table_tensor[:n].to(torch.int32),
            slot_mapping=m.slot_mapping[: m.num_actual_tokens].to(torch.int64),
        )


@dataclass
class Grids:
    """A layer's int8 grids, float32: the cache's ``(scale, offset)`` per kv channel ``[kv_heads, head_dim]`` each;
    the query's FAQuant round trip ``[heads, head_dim]`` or None; and, with FAQuant and C8 together, C8's round
    trip on K and V before the cache stores them on FAQuant's grid (as qpass's own lowering orders them)."""

    k_cache: tuple[torch.Tensor, torch.Tensor]
    v_cache: tuple[torch.Tensor, torch.Tensor]
    query: tuple[torch.Tensor, torch.Tensor] | None = None
    k_before: tuple[torch.Tensor, torch.Tensor] | None = None
    v_before: tuple[torch.Tensor, torch.Tensor] | None = None


def round_trip(x: torch.Tensor, grid: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``x`` ``[tokens, heads, head_dim]`` quantized to int8 on ``grid`` and back, in ``x``'s dtype."""
    return dequantize_int8(quantize_int8(x.float(), *grid), *grid, torch.float32).to(x.dtype)


def split_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's ``[num_blocks, kv_heads, block_size, 2 * head_dim]`` layer cache as the ops' key and value caches
    ``[num_blocks, block_size, kv_heads, head_dim]`` (views of the same memory)."""
    head_dim = kv_cache.shape[-1] // 2
    return kv_cache[..., :head_dim].transpose(1, 2), kv_cache[..., head_dim:].transpose(1, 2)


class QpassInt8Impl(AttentionImpl[QpassInt8Metadata]):
    """Paged int8 attention with a layer's :class:`Grids` (set by the quantization method after loading)."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes=None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **extra,
    ) -> None:
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.attn_type = attn_type
        self.sliding_window = sliding_window
        self.grids: Grids | None = None

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        g = self.grids
        n = slot_mapping.shape[0]
        key, value = key[:n], value[:n]
        if g.k_before is not None:
            key, value = round_trip(key, g.k_before), round_trip(value, g.v_before)
        key_cache, value_cache = split_cache(kv_cache)
        reshape_and_cache_int8(
            key.float(), value.float(), key_cache, value_cache, slot_mapping.to(torch.int64), *g.k_cache, *g.v_cache
        )

    def forward(
        self,
        layer,
        query,
        key,
        value,
        kv_cache,
        attn_metadata,
        output,
        output_scale=None,
        output_block_scale=None,
    ):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("qpass's int8 attention does not fuse output quantization")
        if attn_metadata is None:  # vLLM's warm-up and profiling runs
            return output
        g, n = self.grids, attn_metadata.num_actual_tokens
        q = query[:n]
        if g.query is not None:
            q = round_trip(q, g.query)
        key_cache, value_cache = split_cache(kv_cache)
        out = paged_prefill_attention_int8(
            q.float(),
            key_cache,
            value_cache,
            attn_metadata.block_table,
            attn_metadata.seq_lens,
            attn_metadata.query_start_loc,
            *g.k_cache,
            *g.v_cache,
            self.scale,
        )
        output[:n] = out.to(output.dtype)
        return output
