"""SmoothQuant with a per-channel shift (anti-method m2), as far as it folds exactly.

Outlier Suppression+ subtracts a per-channel shift ``z = (max + min) / 2`` before scaling, so the
scale sees each channel's spread, not its offset: ``s = (max|X - z|)^a / max|W|^(1-a)``. Folding
``X - z`` exactly needs a bias on what produces ``X`` (``norm_bias -= z * norm_weight``; the
consumers' bias ``+= W z``); an RMSNorm has none, and the recipe format (``qpass/smoothing.py``,
MindIE's ``w8a8`` tensors) carries no shift tensor. So this pass folds only the scale computed from
the shifted range; the remaining per-tensor offset is what the asymmetric activation offset absorbs.
The float function is unchanged, as with every smoothing pass.
"""

from qpass.passes.smooth_quant import SmoothingPass, smoothquant_scale, to_prev


class SmoothQuantShiftPass(SmoothingPass):
    """m2: ``s = max|X - z|^alpha / max|W|^(1 - alpha)``, ``z = (max + min) / 2`` per channel."""

    def __init__(self, groups, stats, act_method: int = 1, alpha: float = 0.5):
        super().__init__(groups, stats, act_method)
        self.alpha = alpha

    def group_scale(self, group, x, weight):
        spread = (x.max - x.min) / 2.0  # max |X - z| per channel
        return smoothquant_scale(to_prev(spread, group, "max"), to_prev(weight.abs().amax(0), group, "max"), self.alpha)
