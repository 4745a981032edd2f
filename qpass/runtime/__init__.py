"""Runtime ops for quantized attention, registered with torch.library (namespace ``qpass``)."""

from qpass.runtime.quant_ops import dequantize_int8, quantize_int8
from qpass.runtime.int8_attention import int8_kv_attention
from qpass.runtime.w8a8 import W8A8Linear, W8A8Weights, w8a8_linear, w8a8_weights
from qpass.runtime.paged_cache import BlockAllocator, BlockTables, allocate_kv_cache, reshape_and_cache_int8
from qpass.runtime.paged_attention_faquant import paged_attention_int8_faquant, paged_attention_int8_faquant_reference
from qpass.runtime.paged_attention import (
    paged_attention_int8,
    paged_attention_int8_reference,
    paged_prefill_attention_int8,
    paged_prefill_attention_int8_reference,
)

__all__ = [
    "BlockAllocator", "BlockTables", "W8A8Linear", "W8A8Weights", "allocate_kv_cache", "dequantize_int8", "int8_kv_attention",
    "paged_attention_int8", "paged_attention_int8_faquant", "paged_attention_int8_faquant_reference",
    "paged_attention_int8_reference", "paged_prefill_attention_int8", "paged_prefill_attention_int8_reference",
    "quantize_int8", "reshape_and_cache_int8", "w8a8_linear", "w8a8_weights",
]
