"""The generic quantized-attention op: causal attention over int8 K and V, before any cache layout.

Lowering runs in two stages (``passes/fx/fuse_quantized_attention.py``, then
``passes/fx/lower_paged_attention.py``): attention with Q/DQ on K and V first becomes this one op,
which says what is computed and nothing about how; a backend pass then turns it into a cache write
and paged attention. Its implementation here is the plain reference (quantize, dequantize, repeat
for GQA, causal softmax attention), which any lowering must reproduce. ``int8_kv_attention_dynamic`` is
the same over the dynamic cache (``--kv-int8 dynamic``), whose scales come from K and V themselves.
"""

import torch

from qpass.core.int8 import dequantize, fake_quant_dynamic, quantize


def _kv_layout(t: torch.Tensor) -> torch.Tensor:
    """``[kv_heads, head_dim]`` -> ``[kv_heads, 1, head_dim]`` to broadcast over ``[B, kv_heads, S, head_dim]``."""
    return t.reshape(t.shape[0], 1, t.shape[1])


@torch.library.custom_op("qpass::int8_kv_attention", mutates_args=())
def int8_kv_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_scale: torch.Tensor,
    k_offset: torch.Tensor,
    v_scale: torch.Tensor,
    v_offset: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """Causal attention with K and V stored as int8, per channel.

    q: ``[B, H, S, D]`` float; k, v: ``[B, H_kv, S, D]`` float, quantized here as a cache write would;
    k_scale, k_offset, v_scale, v_offset: float32 ``[H_kv, D]`` (``q = clamp(round(x / scale) + offset)``).
    H must be a multiple of H_kv (GQA). Query ``i`` sees keys ``0 .. i``. Returns ``[B, H, S, D]`` in q's dtype.
    """
    group = q.shape[1] // k.shape[1]
    ks, ko, vs, vo = (_kv_layout(t) for t in (k_scale, k_offset, v_scale, v_offset))
    k = dequantize(quantize(k, ks, ko), ks, ko, q.dtype).repeat_interleave(group, dim=1)
    v = dequantize(quantize(v, vs, vo), vs, vo, q.dtype).repeat_interleave(group, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale)


@int8_kv_attention.register_fake
def _(q, k, v, k_scale, k_offset, v_scale, v_offset, softmax_scale):
    return torch.empty_like(q)


@torch.library.custom_op("qpass::int8_kv_attention_dynamic", mutates_args=())
def int8_kv_attention_dynamic(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Causal attention with K and V stored as int8 with an asymmetric scale and offset per token and KV head.

    q: ``[B, H, S, D]`` float; k, v: ``[B, H_kv, S, D]`` float, quantized here as the dynamic cache write
    would (each ``[D]`` row from its min and max). Otherwise as :func:`int8_kv_attention`.
    """
    group = q.shape[1] // k.shape[1]
    k = fake_quant_dynamic(k).to(q.dtype).repeat_interleave(group, dim=1)
    v = fake_quant_dynamic(v).to(q.dtype).repeat_interleave(group, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale)


@int8_kv_attention_dynamic.register_fake
def _(q, k, v, softmax_scale):
    return torch.empty_like(q)
