"""SmoothQuant (anti-method m1): ``s = max|X|^a / max|W|^(1-a)`` per input channel, folded upstream.

Also the mechanism every smoothing pass shares (:class:`SmoothingPass`): per group, compute the scale
``s [prev channels]`` from the calibration statistics of the group's input and the consumers'
weights, then fold it into the calibration module's parameters with
:func:`qpass.smoothing.apply_smoothing` (new tensors are assigned; the old ones, which the input
model may share, are never written). The float function is unchanged; later calibration observes
the smoothed activations.
"""

import abc

import torch
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from qpass.linear_observer import LinearObserver
from qpass.passes.find_linear_sites import SmoothGroup
from qpass.smoothing import apply_smoothing, consumer_scale

MODULE_PREFIX = "model."  # the capture wrapper's attribute holding the HF model (see qpass/capture.py)
MIN_SCALE = 1e-5


class SmoothingPass(PassBase):
    """Compute and fold one scale per :class:`SmoothGroup` into the unlifted calibration module. In place.

    ``stats``: input node name -> :class:`LinearObserver` of the float run. After the pass,
    ``self.scales`` holds the scales in ``groups`` order (float32 ``[prev channels]``).
    """

    in_place = True

    def __init__(self, groups: list[SmoothGroup], stats: dict[str, LinearObserver], act_method: int = 1):
        super().__init__()
        self.groups, self.stats, self.act_method = groups, stats, act_method
        self.scales: list[torch.Tensor] = []

    @abc.abstractmethod
    def group_scale(self, group: SmoothGroup, x: LinearObserver, weight: torch.Tensor) -> torch.Tensor:
        """``s [group.channels]`` for consumers with stacked ``weight [n, C]``: what each method defines."""

    def call(self, gm: GraphModule) -> PassResult:
        self.scales = []
        for g in self.groups:
            weight = torch.cat([module_param(gm, f"{c}.weight").detach().float() for c in g.consumers])
            s = self.group_scale(g, self.stats[g.input], weight).float()
            self.scales.append(torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s)).clamp(min=MIN_SCALE))
        modified = fold_into_module(gm, self.groups, self.scales)
        return PassResult(gm, modified)


class SmoothQuantPass(SmoothingPass):
    """m1: ``s = max|X|^alpha / max|W|^(1 - alpha)`` per channel (``alpha`` 0.5 by default)."""

    def __init__(self, groups, stats, act_method: int = 1, alpha: float = 0.5):
        super().__init__(groups, stats, act_method)
        self.alpha = alpha

    def group_scale(self, group, x, weight):
        return smoothquant_scale(to_prev(x.absmax, group, "max"), to_prev(weight.abs().amax(0), group, "max"), self.alpha)


def smoothquant_scale(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``x_absmax^alpha / w_absmax^(1 - alpha)``; 1 where either is 0."""
    s = x_absmax.double().pow(alpha) / w_absmax.double().pow(1.0 - alpha)
    return torch.where((x_absmax > 0) & (w_absmax > 0), s, torch.ones_like(s)).float()


def to_prev(v: torch.Tensor, group: SmoothGroup, how: str) -> torch.Tensor:
    """A per-consumer-channel statistic ``[C]`` reduced to prev's channels (GQA: over the repeated head blocks)."""
    if group.group == 1:
        return v
    blocks = v.reshape(-1, group.group, group.head_dim)
    return (blocks.amax(1) if how == "max" else blocks.mean(1)).reshape(-1)


def to_consumer(s: torch.Tensor, group: SmoothGroup) -> torch.Tensor:
    """prev's scale ``[channels]`` expanded to the consumers' input channels."""
    return consumer_scale(s, group.group, group.head_dim)


def module_param(gm: GraphModule, name: str) -> torch.Tensor:
    """The parameter with HF name ``name`` in an unlifted capture module."""
    return gm.get_parameter(MODULE_PREFIX + name)


def fold_into_module(gm: GraphModule, groups: list[SmoothGroup], scales: list[torch.Tensor]) -> bool:
    """Fold ``scales`` into ``gm``'s parameters (by assigning new tensors); True if any parameter changed."""
    doc = [g.to_recipe(f"s{i}") for i, g in enumerate(groups)]
    names = {f"{g['prev']}.weight" for g in doc} | {f"{g['prev']}.bias" for g in doc} | {f"{c}.weight" for g in doc for c in g["consumers"]}
    params = {}
    for n in names:
        try:
            params[n] = module_param(gm, n)
        except AttributeError:
            pass  # no bias
    new = apply_smoothing(params, doc, {f"s{i}": s for i, s in enumerate(scales)})
    modified = False
    for name, value in new.items():
        if value is params[name]:
            continue
        modified |= not torch.equal(value, params[name])
        owner, _, leaf = (MODULE_PREFIX + name).rpartition(".")
        setattr(gm.get_submodule(owner), leaf, torch.nn.Parameter(value.detach(), requires_grad=False))
    return modified
