"""Runtime ops for quantized attention, registered with torch.library (namespace ``qpass``)."""

from qpass.runtime.quant_ops import dequantize_int8, quantize_int8

__all__ = ["dequantize_int8", "quantize_int8"]
