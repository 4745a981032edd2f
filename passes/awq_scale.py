"""Activation-aware scaling (anti-method m3): ``s = stat|X|^r``, ``r`` searched against the block error.

Per group, each activation statistic (``mean|X|``, as msModelSlim's m3, and ``max|X|`` per channel)
and each ``r`` on ``GRID`` give ``s = stat^r`` (normalised so ``max(s) * min(s) = 1``); the pair chosen
minimises the output error of the group's W8A8 consumers on the calibration sample,
``|| fq(X / s) fq(W s)^T - X W^T ||^2`` per token, relative to the token's output
(:func:`qpass.linear_observer.quantized_output_error`), with the activation step set by the range of
the whole calibration run (outlier tokens are rare in the sample but decide the per-tensor scale).

``max|X|`` is searched too because a per-tensor int8 step is set by the largest value, not the mean:
on SmolLM2 the down_proj inputs carry single channels thousands of times their bulk, which
``mean|X|^r`` cannot bring down (all-int8 perplexity +11.7% with ``mean`` alone, +4.6% with both;
docs/benchmarks.md). ``r = 0`` (no smoothing) is on the grid, so the search never does worse than
no smoothing on the sample.
"""

import torch

from qpass.linear_observer import quantized_output_error
from qpass.passes.smooth_quant import SmoothingPass, to_consumer, to_prev

GRID = tuple(round(0.05 * i, 2) for i in range(21))  # 0, 0.05, ..., 1
STATISTICS = ("mean", "max")  # per-channel mean|X| and max|X|


class AWQScalePass(SmoothingPass):
    """m3: the grid search above; ``self.statistics`` and ``self.exponents`` hold the chosen pair per group."""

    def __init__(self, groups, stats, act_method: int = 1, grid: tuple[float, ...] = GRID):
        super().__init__(groups, stats, act_method)
        self.grid = grid
        self.statistics: list[str] = []
        self.exponents: list[float] = []

    def call(self, gm):
        self.statistics, self.exponents = [], []
        return super().call(gm)

    def group_scale(self, group, x, weight):
        sample = x.sample()
        reference = sample @ weight.t()
        candidates = {"mean": to_prev(x.mean_abs, group, "mean"), "max": to_prev(x.absmax, group, "max")}
        none = torch.ones_like(candidates["mean"])
        best = (quantized_output_error(sample, weight, to_consumer(none, group), self.act_method, reference, x.min, x.max),
                STATISTICS[0], 0.0, none)
        for name in STATISTICS:
            stat = candidates[name].clamp(min=1e-8)
            for r in self.grid:
                if r == 0.0:
                    continue  # no smoothing: measured above
                s = stat.pow(r)
                s = s / (s.max() * s.min()).sqrt()
                err = quantized_output_error(sample, weight, to_consumer(s, group), self.act_method, reference, x.min, x.max)
                if err < best[0]:
                    best = (err, name, r, s)
        self.statistics.append(best[1])
        self.exponents.append(best[2])
        return best[3]
