"""The attention backends the plugin puts in place of vLLM's on every layer of a qpass model: the KV cache lives in
vLLM's paged blocks as int8 (:mod:`qpass.vllm.int8_layer` says how a page is laid out), written by qpass's cache
ops with the checkpoint's static per-channel scales and offsets (``QPASS_INT8``) or per token and kv head
(``QPASS_INT8_DYNAMIC``), and attention runs qpass's paged prefill op (one op for a batch of prefills, chunked
prefills and decodes: vLLM's ``query_start_loc`` is its ``query_start_loc``). The ops choose their backend by
device: the folded PyTorch path on CPU, the Triton kernel on CUDA.
"""

from dataclasses import dataclass, replace
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

from qpass.runtime.paged_checks import BLOCK_SIZES, HEAD_DIMS
from qpass.vllm.int8_layer import Grids, Views, attend, content_bytes, write_cache

NAME, DYNAMIC_NAME = "QPASS_INT8", "QPASS_INT8_DYNAMIC"


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


class QpassInt8DynamicBackend(QpassInt8Backend):
    """The dynamic cache: each token and kv head's scale and offset in the page beside its codes."""

    @staticmethod
    def get_name() -> str:
        return DYNAMIC_NAME

    @classmethod
    def customize_spec(cls, spec):
        return replace(spec, state_content_bytes=content_bytes(spec.head_size, dynamic=True))


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
        self.views: Views | None = None

    def split(self, kv_cache):
        if self.views is None:
            self.views = Views(self.grids.dynamic)
        return self.views(kv_cache)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        write_cache(self.grids, key, value, kv_cache, slot_mapping, self.split(kv_cache))

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
        m = attn_metadata
        n = m.num_actual_tokens
        tables = (m.block_table, m.seq_lens, m.query_start_loc)
        output[:n] = attend(self.grids, query[:n], kv_cache, *tables, self.scale, self.split(kv_cache))
        return output
