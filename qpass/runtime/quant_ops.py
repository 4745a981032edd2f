"""Quantize / Dequantize ops (int8, affine) inserted by the Q/DQ passes.

The cache and every Q/DQ pair hold ``q = clamp(round(x / scale) + offset, -128, 127)`` and give back
``x ~= (q - offset) * scale``. ``scale`` and ``offset`` broadcast against ``x`` (for a ``[B, H, S, D]``
tensor quantized per head and per dim they are shaped ``[H, 1, D]``).

The dynamic cache (``--kv-int8 dynamic``) has one op, its round trip: each row of the last dim
(per token and KV head of ``[B, H_kv, S, D]``) with its own asymmetric scale and offset, from the row's min and max.
"""

import torch

from qpass.core.int8 import dequantize, fake_quant_dynamic, quantize


@torch.library.custom_op("qpass::quantize_int8", mutates_args=())
def quantize_int8(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Affine int8 quantization of ``x`` with broadcastable ``scale`` and ``offset``."""
    return quantize(x, scale, offset)


@quantize_int8.register_fake
def _(x, scale, offset):
    return torch.empty_like(x, dtype=torch.int8)


@torch.library.custom_op("qpass::dequantize_int8", mutates_args=())
def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_int8`: ``(q - offset) * scale`` in ``dtype``."""
    return dequantize(q, scale, offset, dtype)


@dequantize_int8.register_fake
def _(q, scale, offset, dtype):
    return torch.empty_like(q, dtype=dtype)


@torch.library.custom_op("qpass::fake_quant_int8_dynamic", mutates_args=())
def fake_quant_int8_dynamic(x: torch.Tensor) -> torch.Tensor:
    """What the dynamic int8 cache stores and gives back for ``x [..., D]``: per row of the last dim,
    ``scale, offset`` of its min and max (:func:`qpass.core.int8.dynamic_qparams`), ``(q - offset) * scale``, in
    ``x``'s dtype."""
    return fake_quant_dynamic(x)


@fake_quant_int8_dynamic.register_fake
def _(x):
    return torch.empty_like(x)
