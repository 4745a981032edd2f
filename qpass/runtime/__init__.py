"""Runtime ops for quantized attention, registered with torch.library (namespace ``qpass``)."""

from qpass.runtime.int8_attention import int8_kv_attention, int8_kv_attention_dynamic
from qpass.runtime.paged_attention import (
    paged_attention_int8,
    paged_attention_int8_reference,
    paged_prefill_attention_int8,
    paged_prefill_attention_int8_reference,
)
from qpass.runtime.paged_attention_dynamic import (
    paged_attention_int8_dynamic,
    paged_attention_int8_dynamic_reference,
    paged_prefill_attention_int8_dynamic,
    paged_prefill_attention_int8_dynamic_reference,
)
from qpass.runtime.paged_attention_faquant import paged_attention_int8_faquant, paged_attention_int8_faquant_reference
from qpass.runtime.paged_cache import (
    BlockAllocator,
    BlockTables,
    allocate_kv_cache,
    allocate_kv_scale_cache,
    reshape_and_cache_int8,
    reshape_and_cache_int8_dynamic,
)
from qpass.runtime.quant_ops import dequantize_int8, fake_quant_int8_dynamic, quantize_int8
from qpass.runtime.w8a8 import (
    W8A8DynamicLinear,
    W8A8DynamicWeights,
    W8A8Linear,
    W8A8Weights,
    w8a8_dynamic_linear,
    w8a8_dynamic_weights,
    w8a8_linear,
    w8a8_weights,
)

__all__ = [
    "BlockAllocator",
    "BlockTables",
    "W8A8DynamicLinear",
    "W8A8DynamicWeights",
    "W8A8Linear",
    "W8A8Weights",
    "allocate_kv_cache",
    "allocate_kv_scale_cache",
    "dequantize_int8",
    "fake_quant_int8_dynamic",
    "int8_kv_attention",
    "int8_kv_attention_dynamic",
    "paged_attention_int8",
    "paged_attention_int8_dynamic",
    "paged_attention_int8_dynamic_reference",
    "paged_attention_int8_faquant",
    "paged_attention_int8_faquant_reference",
    "paged_attention_int8_reference",
    "paged_prefill_attention_int8",
    "paged_prefill_attention_int8_dynamic",
    "paged_prefill_attention_int8_dynamic_reference",
    "paged_prefill_attention_int8_reference",
    "quantize_int8",
    "reshape_and_cache_int8",
    "reshape_and_cache_int8_dynamic",
    "w8a8_dynamic_linear",
    "w8a8_dynamic_weights",
    "w8a8_linear",
    "w8a8_weights",
]
