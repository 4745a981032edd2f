"""Calibration statistics of one value seen as ``[tokens, channels]``, mergeable across runs.

A frontend flattens each observed value to ``x [tokens, C]`` (attention values ``[B, H, S, D]`` with
channel ``c = h * D + d``, so one observer serves FAQuant ``[heads, head_dim]`` and C8
``[kv_heads * head_dim]``; a Linear's input ``[..., C]`` as it is) and calls :meth:`Observer.update`.
The observer keeps per-channel min / max / sum|x|, the whole tensor's first two moments, and every
``stride``-th token up to ``max_tokens`` (cheap during the forward) and, given ``window``, each
calibration window's per-channel min and max (how the extremes vary from window to window says how
far they may reach on text the calibration did not see) and, given ``pairs``, the largest norm of each RoPE
channel pair per angle (how far a pair reaches when the rotation turns it further than calibration saw);
ranges are chosen at the end from these (:mod:`qpass.core.ranges`). Two observers of the same value merge
(:meth:`Observer.merge`), so statistics gathered in pieces (layer by layer, batch by batch) give the same result.
"""

import math

import torch

from qpass.core.errors import QpassError

ANGLE_BINS = 64  # angle bins of a RoPE pair's reach: 5.6 degrees each


def pair_angle_reach(x: torch.Tensor, head_dim: int, turned: int) -> torch.Tensor:
    """Per RoPE channel pair of ``x [tokens, heads * head_dim]`` (pairs ``(d, d + turned)`` of each head) and per
    ``ANGLE_BINS``-th of the circle, the largest norm of a token whose pair points into that bin: ``[heads * turned,
    ANGLE_BINS]``, 0 where none does. Rotation keeps a pair's norm and moves its angle, so this says where a pair can
    reach at any angle it is turned by (:func:`qpass.core.ranges.rotary_range`)."""
    v = x.float().reshape(x.shape[0], -1, head_dim)
    a, b = v[..., :turned].reshape(x.shape[0], -1), v[..., turned : 2 * turned].reshape(x.shape[0], -1)
    norm, angle = torch.hypot(a, b), torch.atan2(b, a)  # [tokens, pairs]; angle in [-pi, pi]
    bins = ((angle + math.pi) * (ANGLE_BINS / (2 * math.pi))).long().clamp_(0, ANGLE_BINS - 1)
    reach = torch.zeros(norm.shape[1], ANGLE_BINS)
    return reach.scatter_reduce_(1, bins.t(), norm.t(), reduce="amax")


class Observer:
    """Statistics of one ``[tokens, C]`` value; keeps every ``stride``-th token of each update, at most ``max_tokens``,
    and with ``window``, the per-channel min and max of every ``window`` consecutive tokens (updates must
    then hold whole windows, as the frontends' ``[B, S, ...]`` values flattened batch-major do).

    ``pairs``: ``(head_dim, turned)`` of a value after RoPE in the rotate-half layout, channels ``(d, d + turned)``
    of each head a pair for ``d < turned``; the observer then keeps, per pair and per ``ANGLE_BINS``-th of the
    circle, the largest norm of a token whose pair points there (:attr:`pair_reach`)."""

    def __init__(
        self, stride: int = 1, max_tokens: int = 2048, window: int | None = None, pairs: tuple[int, int] | None = None
    ):
        self.stride, self.max_tokens, self.window, self.pairs = stride, max_tokens, window, pairs
        self.pair_reach: torch.Tensor | None = None  # [heads * turned, ANGLE_BINS], 0 where no token pointed
        self.window_min: list[torch.Tensor] = []  # [windows, C] blocks, in update order
        self.window_max: list[torch.Tensor] = []
        self.min: torch.Tensor | None = None  # [C]
        self.max: torch.Tensor | None = None
        self.abs_sum: torch.Tensor | None = None  # float64 [C]
        self.count = 0  # tokens seen
        self.total = self.total_sq = 0.0  # sum of x and x^2 over the whole tensor (float64)
        self.buffer: torch.Tensor | None = None  # [max_tokens, C], filled up to `kept`
        self.kept = 0

    def update(self, x: torch.Tensor) -> None:
        """Add the tokens of ``x [tokens, C]``."""
        x = x.detach().float()
        if self.window is None:
            lo, hi = x.amin(0), x.amax(0)
        else:
            if x.shape[0] % self.window:
                raise ValueError(f"an update of {x.shape[0]} tokens is not whole windows of {self.window}")
            per_window = x.view(-1, self.window, x.shape[1])
            self.window_min.append(per_window.amin(1))
            self.window_max.append(per_window.amax(1))
            lo, hi = self.window_min[-1].amin(0), self.window_max[-1].amax(0)
        a = x.abs().sum(0, dtype=torch.float64)
        self._combine(
            lo, hi, a, x.shape[0], float(x.sum(dtype=torch.float64)), float(x.pow(2).sum(dtype=torch.float64))
        )
        self._keep(x[:: self.stride])
        if self.pairs is not None:
            self._reach(pair_angle_reach(x, *self.pairs))

    def merge(self, other: "Observer") -> None:
        """Add everything ``other`` saw (its kept tokens after this one's)."""
        if other.min is None:
            return
        self._combine(other.min, other.max, other.abs_sum, other.count, other.total, other.total_sq)
        self._keep(other.sample())
        self.window_min += other.window_min
        self.window_max += other.window_max
        if other.pair_reach is not None:
            self._reach(other.pair_reach)

    def _reach(self, reach: torch.Tensor) -> None:
        self.pair_reach = reach if self.pair_reach is None else torch.maximum(self.pair_reach, reach)

    def _combine(self, lo, hi, abs_sum, count, total, total_sq) -> None:
        if self.min is None:
            self.min, self.max, self.abs_sum = lo.clone(), hi.clone(), abs_sum.clone()
        else:
            self.min, self.max = torch.minimum(self.min, lo), torch.maximum(self.max, hi)
            self.abs_sum = self.abs_sum + abs_sum
        self.count += count
        self.total += total
        self.total_sq += total_sq

    def _keep(self, tokens: torch.Tensor) -> None:
        if self.kept >= self.max_tokens:
            return
        if self.buffer is None:
            self.buffer = torch.empty(self.max_tokens, tokens.shape[1])
        take = tokens[: self.max_tokens - self.kept]
        self.buffer[self.kept : self.kept + take.shape[0]] = take
        self.kept += take.shape[0]

    def _check(self) -> None:
        if self.min is None:
            raise QpassError(
                "an observer saw no data: the calibration run never reached this value; "
                "check that the model's forward uses every attention and Linear"
            )

    @property
    def channels(self) -> int:
        self._check()
        return self.min.numel()

    def sample(self) -> torch.Tensor:
        """The kept tokens, ``[tokens, C]``."""
        self._check()
        return self.buffer[: self.kept] if self.buffer is not None else torch.empty(0, self.min.numel())

    def window_extremes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each window's per-channel ``(min, max)``, ``[windows, C]`` each (empty without ``window``)."""
        self._check()
        if not self.window_min:
            empty = torch.empty(0, self.min.numel())
            return empty, empty
        return torch.cat(self.window_min), torch.cat(self.window_max)

    @property
    def absmax(self) -> torch.Tensor:
        """``max |x|`` per channel, ``[C]``."""
        self._check()
        return torch.maximum(-self.min, self.max)

    @property
    def mean_abs(self) -> torch.Tensor:
        """``mean |x|`` per channel, ``[C]``."""
        self._check()
        return (self.abs_sum / self.count).float()

    def range_ratio(self) -> float:
        """``max(|min|, |max|) / std`` over the whole tensor: how outlier-dominated the range is."""
        self._check()
        n = self.count * self.min.numel()
        mean = self.total / n
        std = max(self.total_sq / n - mean * mean, 0.0) ** 0.5
        return float(self.absmax.max()) / max(std, 1e-12)

    def gaussian_reach(self) -> float:
        """``sqrt(2 ln N)``, N the values seen (tokens x channels): about how many standard deviations the largest
        of N Gaussian values reaches. A :meth:`range_ratio` within it says no outlier sets the range: the bulk does."""
        self._check()
        return math.sqrt(2.0 * math.log(max(self.count * self.min.numel(), 2)))
