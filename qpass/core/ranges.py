"""Range choice: from an :class:`~qpass.core.observers.Observer`'s statistics to int8 scales and offsets.

The per-channel default, ``reach`` (:func:`extreme_range`), widens each channel's range to where its
extremes are expected to reach over 700 windows of text (358,400 tokens at 512 a window), judged from how
they vary across the calibration windows. Ranges fitted to the calibration text alone clip text of another
kind: calibrated on 3,584 tokens of Python's licence and evaluated on Python source, C8 lost 0.40%
perplexity with ``mse`` and ``minmax`` and nothing (-0.01%) with ``reach`` (``docs/benchmarks.md``). ``extreme``,
the previous default, asks for 100x the calibration's windows instead: the same for the licence's 7
windows, but for 64 windows of mixed text it widened ranges the text already covered and lost 0.03-0.16
points to ``mse`` on the standard split, where ``reach`` is within the noise of ``mse``. A clip search trades
range for resolution on the calibration text, which is the wrong trade for text it did not see; the
searches stay for the cases they suit:

- per channel (q/k/v, the KV cache: ``minmax``, ``percentile``, ``mse``): thousands of channels, so
  :func:`mse_range` scores each candidate on a per-channel histogram with prefix sums (O(1) per
  candidate and channel); the candidates are fractions 0.30 .. 1 of the range (``CLIP_GRID``);
- per tensor (W8A8 activations, ``--act-method 2/3``): one range over all channels, where single
  outlier channels sit 100x above the bulk. A histogram of that range cannot resolve the bulk, so
  :func:`least_l2_clip` measures each candidate's int8 round trip exactly, on a grid that reaches
  down to 1% of the range (``CLIP_FRACTIONS``).
"""

import math

import torch

from qpass.core.int8 import affine_qparams, fake_quant
from qpass.core.observers import ANGLE_BINS, Observer

RANGE_METHODS = ("minmax", "percentile", "mse", "extreme", "reach")
EULER_GAMMA = 0.5772156649015329
GROWTH = 100.0  # extreme: the range is set for this many times the calibration text
REACH_WINDOWS = 700.0  # reach: the range is set for this many windows of text, whatever the calibration's size
HIST_BINS = 512
CLIP_GRID = torch.linspace(0.30, 1.0, 71)  # per-channel candidates, fractions of the observed range
ACT_METHODS = {1: "min-max", 2: "histogram", 3: "auto"}
AUTO_RATIO = 50.0  # act-method 3: histogram when max(|min|, |max|) / std <= this, else min-max
CLIP_FRACTIONS = torch.logspace(0.0, -2.0, 81)  # per-tensor candidates
MAX_SEARCH_VALUES = 1 << 16


def channel_qparams(
    obs: Observer, method: str, symmetric: bool, percentile: float = 99.99
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale [C], offset [C])`` float32 for ``method`` in minmax / percentile / mse."""
    return affine_qparams(*channel_range(obs, method, symmetric, percentile), symmetric)


def channel_range(
    obs: Observer, method: str, symmetric: bool, percentile: float = 99.99
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(lo [C], hi [C])`` that ``method`` chooses (:func:`channel_qparams`)."""
    lo, hi = obs.min, obs.max
    if method == "percentile":
        q = torch.tensor([1.0 - percentile / 100.0, percentile / 100.0])
        lo_p, hi_p = torch.quantile(obs.sample(), q, dim=0)
        lo, hi = torch.maximum(lo, lo_p), torch.minimum(hi, hi_p)
    elif method == "mse":
        lo, hi = mse_range(obs.sample(), lo, hi, symmetric)
    elif method in ("extreme", "reach"):
        windows = obs.window_extremes()[1].shape[0]
        lo, hi = extreme_range(obs, GROWTH * windows if method == "extreme" else REACH_WINDOWS)
    elif method != "minmax":
        raise ValueError(f"unknown range method {method!r}; choose one of {', '.join(RANGE_METHODS)}")
    return lo, hi


def rotary_range(
    obs: Observer, lo: torch.Tensor, hi: torch.Tensor, head_dim: int, frequencies: torch.Tensor, context: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ranges ``lo, hi [heads * head_dim]`` of a value after RoPE, chosen from ``obs`` (which saw it at
    positions below its ``window``, with ``pairs``), widened to hold at every position below ``context``.

    RoPE turns channel pair ``(d, d + r/2)`` of each head (the rotate-half layout; ``r = 2 * len(frequencies)``,
    channels from ``r`` on are not turned) by ``p * frequencies[d]`` at position ``p``, counter-clockwise (channel
    ``d`` the cosine, ``d + r/2`` the sine). A pair that turns a full circle within the window has shown every angle;
    a slower one has not, and further on its channels take values calibration never saw (SmolLM2, C8 from 512-token
    windows: +11% perplexity at positions 1k-2k). A token seen pointing at angle ``a`` at a position below the window
    pointed at ``a - window * f`` or later at position 0, and comes at angles up to ``a + context * f`` below the
    context. So each slow pair's channels are widened to where the norms ``obs.pair_reach`` kept per angle bin reach
    over those angles: the reach of the text seen, not a bound from each channel's extremes (which gave every token
    the norm ``sqrt(A_d^2 + A_d'^2)``, ``A`` each channel's largest magnitude, and turned it by the whole turn,
    costing SmolLM2's C8 0.26% on short windows at 8,192). The kept norms grow by the factor ``lo, hi`` grew the
    pair's channels' largest magnitudes by (the headroom of ``reach``), and stay within that bound."""
    turned = frequencies.numel()
    if 2 * turned > head_dim or obs.window is None or obs.window >= context:
        return lo, hi
    if obs.pair_reach is None:
        raise ValueError("rotary_range needs an observer given the RoPE pairs (Observer(pairs=...))")
    lo, hi = lo.double().view(-1, head_dim), hi.double().view(-1, head_dim)
    heads, freq = lo.shape[0], frequencies.double()
    observed = obs.absmax.double().view(heads, head_dim)[:, : 2 * turned]
    chosen = torch.maximum(lo.abs(), hi.abs())[:, : 2 * turned]
    growth = torch.where(observed > 0, chosen / observed.clamp(min=1e-30), 1.0)
    growth = torch.maximum(growth[:, :turned], growth[:, turned:])  # [heads, turned]
    bound = (chosen[:, :turned].square() + chosen[:, turned:].square()).sqrt()
    norm = torch.minimum(obs.pair_reach.double().view(heads, turned, ANGLE_BINS) * growth[..., None], bound[..., None])
    edges = torch.linspace(-math.pi, math.pi, ANGLE_BINS + 1, dtype=torch.float64)
    start = edges[:-1] - obs.window * freq[:, None]  # [turned, bins]: the angles a bin's tokens may come at
    end = edges[1:] + context * freq[:, None]
    seen, slow = norm > 0, obs.window * freq < 2 * math.pi
    wide_lo, wide_hi = lo.clone(), hi.clone()
    for channels, shift in ((slice(0, turned), 0.0), (slice(turned, 2 * turned), math.pi / 2)):  # cos, then sin
        least, most = _cos_bounds(start - shift, end - shift)
        reach_hi = torch.where(seen, norm * most, -math.inf).amax(-1)
        reach_lo = torch.where(seen, norm * least, math.inf).amin(-1)
        wide_hi[:, channels] = torch.where(slow, torch.maximum(hi[:, channels], reach_hi), hi[:, channels])
        wide_lo[:, channels] = torch.where(slow, torch.minimum(lo[:, channels], reach_lo), lo[:, channels])
    return wide_lo.reshape(-1).float(), wide_hi.reshape(-1).float()


def _cos_bounds(start: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The least and the largest cosine of any angle in ``[start, end]``, elementwise."""
    first, last = start.cos(), end.cos()
    ends_lo, ends_hi = torch.minimum(first, last), torch.maximum(first, last)
    peak = torch.ceil(start / (2 * math.pi)) * 2 * math.pi <= end  # a multiple of 2 pi lies within
    trough = torch.ceil((start - math.pi) / (2 * math.pi)) * 2 * math.pi + math.pi <= end
    return torch.where(trough, -1.0, ends_lo), torch.where(peak, 1.0, ends_hi)


def extreme_range(obs: Observer, windows: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, the range its extremes are expected to reach over ``windows`` windows of text.

    Each window's maximum is modelled as a Gumbel variable (the law of maxima of many light-tailed
    values), fitted per channel by its moments over the calibration windows; the expected maximum of
    ``windows`` such maxima is ``mean + beta * ln(windows)`` with ``beta = std * sqrt(6) / pi``.
    ``extreme`` asks for 100 times the calibration's windows; ``reach`` for a fixed ``REACH_WINDOWS``, so a
    large calibration (whose observed range already covers most of what text of its kind reaches) gets less
    headroom than a small one.
    Channels whose extremes vary from window to window (the outliers that text unlike the calibration
    text pushes further) get more headroom than steady ones; a range never shrinks below the observed one.
    """
    w_lo, w_hi = obs.window_extremes()
    if w_hi.shape[0] < 2:
        return obs.min, obs.max
    log_m = torch.log(torch.tensor(windows, dtype=torch.float64))

    def reach(m):  # [windows, C] maxima -> [C]
        m = m.double()
        beta = m.std(0) * (6.0**0.5 / torch.pi)
        return (m.mean(0) + beta * log_m).float()

    return torch.minimum(obs.min, -reach(-w_lo)), torch.maximum(obs.max, reach(w_hi))


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


def act_qparams(
    lo: float, hi: float, sample: torch.Tensor, ratio: float, act_method: int
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Per-tensor asymmetric ``(scale [1], offset [1], method used)`` for an activation with range ``[lo, hi]``.

    ``act_method``: 1 min-max; 2 histogram (the clip with the least L2 error on the sample,
    :func:`least_l2_clip`); 3 histogram when ``ratio = max(|lo|, |hi|) / std <= 50``, else min-max.
    """
    if act_method not in ACT_METHODS:
        raise ValueError(f"act_method={act_method} is not one of {sorted(ACT_METHODS)}")
    use_hist = act_method == 2 or (act_method == 3 and ratio <= AUTO_RATIO)
    lo_t, hi_t = torch.tensor([float(lo)]), torch.tensor([float(hi)])
    scale, offset = affine_qparams(lo_t, hi_t, symmetric=False)
    if use_hist:
        scale, offset = least_l2_clip(sample, lo_t, hi_t)
    return scale.float(), offset.float(), "histogram" if use_hist else "min-max"


def least_l2_clip(sample: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor ``(scale [1], offset [1])`` of the clip ``[t lo, t hi]``, t on ``CLIP_FRACTIONS``, whose int8
    round trip has the least squared error on ``sample [tokens, C]`` (evenly strided whole tokens, at most
    ``MAX_SEARCH_VALUES`` values: striding the flattened values would see only the channels that are a
    multiple of the stride, and miss the outlier channels that decide the clip)."""
    rows = max(1, MAX_SEARCH_VALUES // sample.shape[-1])
    x = sample.reshape(-1, sample.shape[-1])
    x = x[:: -(-x.shape[0] // rows)].reshape(-1).float()
    best = (float("inf"), None)
    for t in CLIP_FRACTIONS:
        scale, offset = affine_qparams(lo * t, hi * t, symmetric=False)
        err = float((fake_quant(x, scale, offset) - x).pow(2).sum())
        if err < best[0]:
            best = (err, (scale, offset))
    return best[1]


def linear_input_qparams(obs: Observer, act_method: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """W8A8 activation qparams of a Linear input from its observer (see :func:`act_qparams`)."""
    return act_qparams(float(obs.min.min()), float(obs.max.max()), obs.sample(), obs.range_ratio(), act_method)
