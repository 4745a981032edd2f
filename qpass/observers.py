"""Calibration observers: they watch one value of the graph and choose its int8 scale and offset.

An observer sees ``x [B, H, S, D]`` and treats every (head, dim) pair as a channel, ``c = h * D + d``,
so its result serves both FAQuant (``[heads, head_dim]``) and C8 (``[kv_heads * head_dim]``).

During the forward pass it only keeps per-channel min/max and a strided sample of tokens (cheap: the
calibration budget is 1.15x a float forward); the range search runs once, at the end, on a
per-channel histogram of the sample.
"""

import torch

QMIN, QMAX = -128, 127
HIST_BINS = 512
CLIP_GRID = torch.linspace(0.30, 1.0, 71)  # candidate fractions of the observed range


class Observer(torch.nn.Module):
    """Per-channel statistics of one ``[B, H, S, D]`` value; keeps every ``stride``-th token."""

    def __init__(self, stride: int = 1, max_tokens: int = 2048):
        super().__init__()
        self.stride = stride
        self.max_tokens = max_tokens
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.buffer: torch.Tensor | None = None  # [max_tokens, H * D], filled up to `kept`
        self.kept = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        lo, hi = x.amin(dim=(0, 2)).float(), x.amax(dim=(0, 2)).float()  # [H, D]
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        if self.kept < self.max_tokens:
            if self.buffer is None:
                self.buffer = torch.empty(self.max_tokens, x.shape[1] * x.shape[3])
            take = x[:, :, :: self.stride, :].transpose(1, 2).reshape(-1, x.shape[1] * x.shape[3])
            take = take[: self.max_tokens - self.kept]
            self.buffer[self.kept : self.kept + take.shape[0]] = take
            self.kept += take.shape[0]
        return x

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, D)`` of the observed value."""
        if self.min is None:
            raise RuntimeError("observer saw no data: the calibration run never reached this value")
        return tuple(self.min.shape)

    def sample(self) -> torch.Tensor:
        """The kept tokens, ``[tokens, H * D]``."""
        return self.buffer[: self.kept] if self.buffer is not None else torch.empty(0, self.min.numel())

    def qparams(self, method: str, symmetric: bool, percentile: float = 99.99) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, offset)``, each ``[H, D]`` float32, for ``method`` in minmax / percentile / mse."""
        lo, hi = self.min.flatten(), self.max.flatten()
        if method == "percentile":
            x = self.sample()
            q = torch.tensor([1.0 - percentile / 100.0, percentile / 100.0])
            lo_p, hi_p = torch.quantile(x, q, dim=0)
            lo, hi = torch.maximum(lo, lo_p), torch.minimum(hi, hi_p)
        elif method == "mse":
            lo, hi = mse_range(self.sample(), lo, hi, symmetric)
        elif method != "minmax":
            raise ValueError(f"unknown observer method {method!r}")
        scale, offset = affine_qparams(lo, hi, symmetric)
        return scale.reshape(self.shape), offset.reshape(self.shape)


def affine_qparams(lo: torch.Tensor, hi: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 scale and offset for the ranges ``[lo, hi]`` (widened to include 0), elementwise.

    Asymmetric: ``scale = (hi - lo) / 255``, ``offset = round(-lo / scale) - 128``.
    Symmetric: ``scale = max(|lo|, |hi|) / 127``, offset 0.
    """
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


def fake_quant(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``(clamp(round(x / scale) + offset) - offset) * scale``: what int8 storage gives back."""
    q = torch.clamp(torch.round(x / scale) + offset, QMIN, QMAX)
    return (q - offset) * scale


def mse_range(sample: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, symmetric: bool):
    """Per channel, the clipped range ``[t * lo, t * hi]`` (t on ``CLIP_GRID``) with the least L2 error.

    ``sample [tokens, C]``; ``lo``, ``hi`` ``[C]``. The error of a candidate is computed on a
    ``HIST_BINS``-bin histogram of the sample: values inside the range cost ``scale^2 / 12`` (uniform
    rounding noise), values outside cost their squared distance to the clip edge. Prefix sums of
    ``n``, ``n c`` and ``n c^2`` over the bins make each candidate O(1) per channel.
    """
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    if symmetric:
        amax = torch.maximum(-lo, hi)
        lo, hi = -amax, amax
    bin_w = ((hi - lo) / HIST_BINS).clamp(min=torch.finfo(torch.float32).tiny)  # [C]
    channels = sample.shape[1]
    idx = ((sample - lo) / bin_w).long().clamp_(0, HIST_BINS - 1)  # [N, C]
    idx += torch.arange(channels) * HIST_BINS  # one histogram per channel, side by side
    counts = torch.bincount(idx.flatten(), minlength=channels * HIST_BINS).view(channels, HIST_BINS).double()
    centers = lo[:, None].double() + (torch.arange(HIST_BINS) + 0.5)[None, :] * bin_w[:, None].double()

    def prefix(v):  # [C, bins + 1], prefix[:, j] = sum over bins < j
        return torch.nn.functional.pad(v.cumsum(1), (1, 0))

    n0, n1, n2 = prefix(counts), prefix(counts * centers), prefix(counts * centers**2)
    t = CLIP_GRID.double()[None, :]  # [1, G]
    a, b = lo[:, None].double() * t, hi[:, None].double() * t  # [C, G] clip edges
    lo_d, bw = lo[:, None].double(), bin_w[:, None].double()
    i_a = torch.ceil((a - lo_d) / bw - 0.5).clamp(0, HIST_BINS).long()  # bins with center < a
    i_b = (torch.floor((b - lo_d) / bw - 0.5) + 1).clamp(0, HIST_BINS).long()  # bins with center <= b
    g = lambda p, i: p.gather(1, i)  # noqa: E731
    below = a**2 * g(n0, i_a) - 2 * a * g(n1, i_a) + g(n2, i_a)
    top = lambda p: p[:, -1:]  # noqa: E731
    above = (top(n2) - g(n2, i_b)) - 2 * b * (top(n1) - g(n1, i_b)) + b**2 * (top(n0) - g(n0, i_b))
    steps = 254.0 if symmetric else 255.0
    inside = (g(n0, i_b) - g(n0, i_a)) * ((b - a) / steps) ** 2 / 12.0
    best = (below + above + inside).argmin(dim=1)
    best_t = CLIP_GRID[best]
    return lo * best_t, hi * best_t


def sqnr_db(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of int8 storage of ``x [tokens, C]`` in dB."""
    noise = (x - fake_quant(x, scale, offset)).pow(2).sum()
    signal = x.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10.0 * torch.log10(signal / noise))
