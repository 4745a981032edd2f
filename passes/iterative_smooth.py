"""Iterative smoothing (anti-method m4): repeated SmoothQuant steps with ``a = 0.9``, the best step kept.

Step ``t`` applies SmoothQuant with ``alpha`` to the statistics already smoothed by steps ``< t``
(``max|X / s|`` and ``max|W s|``, exact because the scaling is per channel), accumulating ``s``.
With ``a = 0.9`` each step moves most of the remaining activation range into the weights, and the
steps alternate between over- and under-smoothing; the pass keeps the accumulated scale (or none) whose
W8A8 block output error on the calibration sample is least.
"""

import torch

from qpass.linear_observer import quantized_output_error
from qpass.passes.smooth_quant import SmoothingPass, smoothquant_scale, to_consumer, to_prev

ALPHA = 0.9
STEPS = 4


class IterativeSmoothPass(SmoothingPass):
    """m4: ``STEPS`` SmoothQuant steps with ``alpha`` (0.9); ``self.steps`` holds the chosen step per group."""

    def __init__(self, groups, stats, act_method: int = 1, alpha: float = ALPHA, steps: int = STEPS):
        super().__init__(groups, stats, act_method)
        self.alpha, self.num_steps = alpha, steps
        self.steps: list[int] = []

    def call(self, gm):
        self.steps = []
        return super().call(gm)

    def group_scale(self, group, x, weight):
        sample = x.sample()
        reference = sample @ weight.t()
        x_absmax, w_absmax = to_prev(x.absmax, group, "max"), to_prev(weight.abs().amax(0), group, "max")
        total = torch.ones_like(x_absmax)
        best = (quantized_output_error(sample, weight, to_consumer(total, group), self.act_method, reference, x.min, x.max), 0, total)
        for step in range(1, self.num_steps + 1):
            total = total * smoothquant_scale(x_absmax / total, w_absmax * total, self.alpha)
            err = quantized_output_error(sample, weight, to_consumer(total, group), self.act_method, reference, x.min, x.max)
            if err < best[0]:
                best = (err, step, total.clone())
        self.steps.append(best[1])
        return best[2]
