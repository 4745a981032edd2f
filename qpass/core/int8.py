"""The one int8 formula: ranges to scale/offset, quantize, dequantize, saturation, and symmetric per-channel weights.

Asymmetric: ``scale = (max - min) / 255``, ``offset = round(-min / scale) - 128`` (range widened to
include 0); symmetric: ``scale = max(|min|, |max|) / 127``, offset 0. Then
``q = clamp(round(x / scale) + offset, -128, 127)`` and ``x ~= (q - offset) * scale``. Dynamic (the
``--kv-int8 dynamic`` cache): asymmetric, with the min and max of each row of the last dim, computed when
the value is quantized (no calibration).
"""

import torch

QMIN, QMAX = -128, 127


def affine_qparams(lo: torch.Tensor, hi: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 scale and offset for the ranges ``[lo, hi]`` (widened to include 0), elementwise."""
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        scale = torch.maximum(-lo, hi) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).clamp(min=tiny)
        return scale, torch.zeros_like(scale)
    scale = (hi - lo) / float(QMAX - QMIN)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).clamp(min=tiny)
    offset = (torch.round(-lo / scale) + QMIN).clamp(QMIN, QMAX)
    return scale, offset


def quantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``clamp(round(x / scale) + offset, -128, 127)`` as int8 (``scale``/``offset`` broadcast against ``x``)."""
    q = torch.round(x.float() / scale.float()) + offset.float()
    return q.clamp_(QMIN, QMAX).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(q - offset) * scale`` in ``dtype``."""
    return ((q.float() - offset.float()) * scale.float()).to(dtype)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``(clamp(round(x / scale) + offset) - offset) * scale``: what int8 storage gives back."""
    q = torch.clamp(torch.round(x / scale) + offset, QMIN, QMAX)
    return (q - offset) * scale


def dynamic_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int8 ``(scale, offset)`` of each row of ``x``'s last dim, from its min and max (widened to
    include 0; scale 1 for a row of zeros), float32 ``[..., 1]`` each: per token and per head for K/V shaped
    ``[B, H_kv, S, D]`` or ``[tokens, H_kv, D]``. Asymmetric, not ``max|x| / 127``: a head's rows are often
    lopsided (one large channel of one sign), and min/max halves their step, which took SmolLM2's
    perplexity increase on Python source from +0.121% to +0.045% (docs/benchmarks.md)."""
    x = x.detach().float()
    return affine_qparams(x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True), symmetric=False)


def quantize_dynamic(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [..., D]`` -> ``(codes int8 [..., D], scale, offset float32 [..., 1])``, per row
    (:func:`dynamic_qparams`)."""
    scale, offset = dynamic_qparams(x)
    return quantize(x, scale, offset), scale, offset


def fake_quant_dynamic(x: torch.Tensor) -> torch.Tensor:
    """What the dynamic int8 cache gives back for ``x [..., D]``, in ``x``'s dtype."""
    q, scale, offset = quantize_dynamic(x)
    return dequantize(q, scale, offset, x.dtype)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``weight [n, k]`` -> ``(Wq int8 [n, k], scale float32 [n])``."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    wq = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return wq, scale


def fake_quant_weight(weight: torch.Tensor) -> torch.Tensor:
    """What the symmetric per-output-channel int8 weight gives back, ``[n, k]`` float."""
    wq, scale = quantize_weight(weight)
    return wq.float() * scale[:, None]


def sqnr_db(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of int8 storage of ``x [tokens, C]`` in dB."""
    noise = (x - fake_quant(x, scale, offset)).pow(2).sum()
    signal = x.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10.0 * torch.log10(signal / noise))


def saturated(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """Where ``x``'s int8 code sits at a limit (clipped, or at the very end of the range), as a bool mask:
    ``round(x / scale) + offset`` at or beyond -128 or 127 (asymmetric), -127 or 127 (symmetric, whose codes
    are meant to stay within [-127, 127])."""
    q = torch.round(x.float() / scale.float()) + offset.float()
    return (q <= (-QMAX if symmetric else QMIN)) | (q >= QMAX)
