"""Activation-aware scaling (anti-method m3): ``s = mean|X|^r``, ``r`` searched against the block error.

Per group, each ``r`` on ``GRID`` gives ``s = mean|X|^r`` (normalised so ``max(s) * min(s) = 1``);
the chosen ``r`` minimises the output error of the group's W8A8 consumers on the calibration sample,
``|| fq(X / s) fq(W s)^T - X W^T ||^2`` (:func:`qpass.linear_observer.quantized_output_error`), with the
activation step set by the range of the whole calibration run (outlier tokens are rare in the sample
but decide the per-tensor scale).
``r = 0`` (no smoothing) is on the grid, so the search never does worse than no smoothing on the sample.
"""

import torch

from qpass.linear_observer import quantized_output_error
from qpass.passes.smooth_quant import SmoothingPass, to_consumer, to_prev

GRID = tuple(round(0.05 * i, 2) for i in range(21))  # 0, 0.05, ..., 1


class AWQScalePass(SmoothingPass):
    """m3: the grid search above; ``self.exponents`` holds the chosen ``r`` per group."""

    def __init__(self, groups, stats, act_method: int = 1, grid: tuple[float, ...] = GRID):
        super().__init__(groups, stats, act_method)
        self.grid = grid
        self.exponents: list[float] = []

    def call(self, gm):
        self.exponents = []
        return super().call(gm)

    def group_scale(self, group, x, weight):
        sample = x.sample()
        reference = sample @ weight.t()
        mean_abs = to_prev(x.mean_abs, group, "mean").clamp(min=1e-8)
        best = (float("inf"), None, None)
        for r in self.grid:
            s = mean_abs.pow(r)
            s = s / (s.max() * s.min()).sqrt()
            err = quantized_output_error(sample, weight, to_consumer(s, group), self.act_method, reference, x.min, x.max)
            if err < best[0]:
                best = (err, r, s)
        self.exponents.append(best[1])
        return best[2] if best[1] else torch.ones_like(mean_abs)
