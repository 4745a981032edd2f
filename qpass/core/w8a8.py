"""W8A8 error math on calibration samples: what int8 activations and weights do to a Linear's output."""

import torch

from qpass.core.int8 import fake_quant, fake_quant_weight
from qpass.core.ranges import act_qparams


def quantized_output_error(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    act_method: int | None = 1,
    reference: torch.Tensor | None = None,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
) -> float:
    """``sum_t ||fq(x_t / s) @ fq(W * s)^T - y_t||^2 / ||y_t||^2``, ``y = x @ W^T``: the output error of W8A8
    Linears after smoothing by ``s``, each token's error relative to its own output.

    Relative per token, because a few tokens (the first of a window, the attention sink) carry
    activations thousands of times the rest: in absolute terms their error alone would decide, and
    the search would trade every other token's precision for theirs.

    ``x [N, C]`` a sample of the shared input, ``weight [n, C]`` the consumers' weights stacked,
    ``scale [C]`` (ones: no smoothing). Activations are quantized per tensor as ``act_method`` says,
    over the range of the whole calibration run when given (``lo``, ``hi`` per channel ``[C]``: rare
    outlier tokens the sample missed still set the int8 step), else over the sample's range. ``act_method``
    None: each token quantized with its own symmetric scale, as dynamic W8A8 does at run time.
    """
    xs = x / scale
    ref = x @ weight.t() if reference is None else reference
    energy = ref.pow(2).sum(-1).clamp(min=torch.finfo(torch.float32).tiny)
    if act_method is None:
        out = fake_quant_per_token(xs) @ fake_quant_weight(weight * scale).t()
        return float(((out - ref).pow(2).sum(-1) / energy).sum())
    lo = float(xs.min()) if lo is None else min(float((lo / scale).min()), float(xs.min()))
    hi = float(xs.max()) if hi is None else max(float((hi / scale).max()), float(xs.max()))
    ratio = max(-lo, hi) / max(float(xs.std()), 1e-12)
    s, o, _ = act_qparams(lo, hi, xs, ratio, act_method)
    out = fake_quant(xs, s, o) @ fake_quant_weight(weight * scale).t()
    return float(((out - ref).pow(2).sum(-1) / energy).sum())


def fake_quant_per_token(x: torch.Tensor) -> torch.Tensor:
    """``x [N, C]`` through dynamic W8A8's activation quantization (symmetric, one scale ``max|x_t| / 127`` per
    token) and back, in ``x``'s dtype."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.round(x / scale).clamp(-127, 127) * scale


def output_sqnr_db(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> float:
    """SQNR (dB) of one W8A8 Linear's output on the sample ``x [N, k]`` with activation qparams ``(scale, offset)``."""
    ref = x @ weight.float().t()
    out = fake_quant(x, scale, offset) @ fake_quant_weight(weight).t()
    noise = float((out - ref).pow(2).sum())
    return float("inf") if noise == 0 else 10.0 * float(torch.log10(ref.pow(2).sum() / noise))
