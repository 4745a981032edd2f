"""Saturation: how often each site's int8 q/k/v hit the limits of the recipe's scales, and when that is a warning.

A value saturates when its int8 code sits at a limit (:func:`qpass.core.int8.saturated`): clipped, or at the
very end of its channel's range. Three figures per attention site (layer) and kind (q, k, v):

- calibration: on the calibration observers' kept sample, the text the ranges were fitted on
  (``recipe.stats["saturation"]``, written by :func:`qpass.core.calibrate.attention_qparams`);
- measured: on evaluation text, or, when a compile has none, on the calibration windows held out of the
  range fitting (:func:`hold_out`), counted by a :class:`SaturationCounter` that the frontend feeds the
  values each site's first int8 Quantize receives during a forward of the quantized program.

A site's kind is flagged when the measured fraction exceeds ``min(max(FLAG_RATIO x calibration, FLAG_FLOOR),
FLAG_CEILING)`` (``FLAG_CEILING`` alone where the recipe has no calibration figure): the text it was measured
on leaves the calibrated ranges far more often than the calibration text did (a sign that the calibration text
is unlike it), or saturates so often that the ranges cannot be right for it whatever the calibration did (a
repetitive calibration text saturates often too: its few distinct values put each channel's extremes at the
limits again and again). Kinds the recipe has no static scales for (a dynamic KV cache) are not counted.
"""

from collections.abc import Mapping

import torch

from qpass.core.evaluate import batches
from qpass.core.int8 import saturated
from qpass.core.recipe import Recipe, site_key

# A min-max range fitted to N tokens leaves about 2/(N+1) of a channel's fresh values outside it (order
# statistics), so matched text saturates about as often as the calibration text: 10x is "far more". Below
# 1e-3 (2/N for N ~ 2000 calibration tokens) saturation is what any finite calibration gives; at 1e-2 one
# value in a hundred is clipped or at the edge, whatever the calibration text did.
FLAG_RATIO = 10.0
FLAG_FLOOR = 1e-3
FLAG_CEILING = 1e-2
HELD_OUT_SHARE = 8  # without evaluation text, 1/8 of the calibration windows (at least 1) measure saturation
KINDS = ("q", "k", "v")


class SaturationCounter:
    """Counts the values of one ``[tokens, C]`` value whose int8 code, with ``scale``/``offset`` ``[C]``, sits at a
    limit; the same ``update`` as :class:`qpass.core.observers.Observer`, so the same frontend taps feed it."""

    def __init__(self, scale: torch.Tensor, offset: torch.Tensor, symmetric: bool):
        self.scale, self.offset, self.symmetric = scale.reshape(-1).float(), offset.reshape(-1).float(), symmetric
        self.hits = 0  # values at a limit
        self.values = 0  # values seen

    def update(self, x: torch.Tensor) -> None:
        """Count the values of ``x [tokens, C]``."""
        self.hits += int(saturated(x.detach(), self.scale, self.offset, self.symmetric).sum())
        self.values += x.numel()

    @property
    def fraction(self) -> float:
        return self.hits / self.values if self.values else 0.0


def kind_qparams(recipe: Recipe, layer: int, kind: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(scale, offset)`` flattened to ``[C]`` (``c = h * head_dim + d``) of the first static int8 Quantize on
    ``kind`` at ``layer``: C8's for k/v (it comes first in the graph), else FAQuant's; None when it has neither."""
    names = ("fa_q",) if kind == "q" else (f"kv_{kind}", f"fa_{kind}")
    for name in names:
        if site_key(layer, name, "scale") in recipe.tensors:
            scale, offset = recipe.get(layer, name)
            return scale.reshape(-1), offset.reshape(-1)
    return None


def counters(recipe: Recipe) -> dict[tuple[int, str], SaturationCounter]:
    """One counter per ``(layer, kind)`` the recipe has static scales for."""
    out = {}
    for site in recipe.sites:
        for kind in KINDS:
            qparams = kind_qparams(recipe, site.layer, kind)
            if qparams is not None:
                out[(site.layer, kind)] = SaturationCounter(*qparams, recipe.config.symmetric)
    return out


def hold_out(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(windows that fit the ranges, held-out windows)``: the last 1/``HELD_OUT_SHARE`` (at least one), or
    None when there is a single window. The windows run in text order, so the held-out ones are text the
    ranges never saw."""
    if windows.shape[0] < 2:
        return windows, None
    held = max(1, windows.shape[0] // HELD_OUT_SHARE)
    return windows[:-held], windows[-held:]


def run(logits_fn, windows: torch.Tensor, batch_size: int) -> None:
    """A forward of ``logits_fn`` over ``windows [N, W]``, for the counters it feeds (its logits are not needed)."""
    with torch.no_grad():
        for batch in batches(windows, batch_size, "saturation"):
            logits_fn(batch)


def table(counted: dict[tuple[int, str], SaturationCounter]) -> dict[str, dict[str, float]]:
    """``{layer: {kind: fraction}}`` of the counters, as the report and ``recipe.stats`` hold it."""
    out: dict[str, dict[str, float]] = {}
    for (layer, kind), counter in sorted(counted.items(), key=lambda item: (item[0][0], KINDS.index(item[0][1]))):
        out.setdefault(str(layer), {})[kind] = counter.fraction
    return out


def calibration_table(recipe: Recipe) -> dict[str, dict[str, float]]:
    """``{layer: {kind: fraction}}`` from ``recipe.stats["saturation"]``, for the kinds with static scales (a dynamic
    cache's k/v have none); figures a recipe read from elsewhere holds in another shape are left out."""
    static = {(str(layer), kind) for layer, kind in counters(recipe)}
    doc = recipe.stats.get("saturation")
    out: dict[str, dict[str, float]] = {}
    for layer, kinds in doc.items() if isinstance(doc, Mapping) else ():
        for kind, fraction in kinds.items() if isinstance(kinds, Mapping) else ():
            if (layer, kind) in static and isinstance(fraction, (int, float)) and not isinstance(fraction, bool):
                out.setdefault(layer, {})[kind] = float(fraction)
    return out


def limit(calibration: float | None) -> float:
    """The measured fraction above which a site's kind is flagged, given its calibration fraction (None where the
    recipe has no figure, e.g. one read from a MindIE directory: then only ``FLAG_CEILING``)."""
    return FLAG_CEILING if calibration is None else min(max(FLAG_RATIO * calibration, FLAG_FLOOR), FLAG_CEILING)


def flagged(measured: dict, calibration: dict) -> dict[str, list[str]]:
    """``{layer: [kind, ...]}`` of the sites and kinds whose measured fraction exceeds :func:`limit` of their
    calibration fraction."""
    out = {}
    for layer, kinds in sorted(measured.items(), key=lambda item: int(item[0])):
        over = [kind for kind, fraction in kinds.items() if fraction > limit(calibration.get(layer, {}).get(kind))]
        if over:
            out[layer] = over
    return out


def flagged_names(sat: dict) -> list[str]:
    """``"layer <i> <kind>"`` for each flagged site and kind of a report's saturation section."""
    return [f"layer {layer} {kind}" for layer, kinds in sat["flagged"].items() for kind in kinds]


def section(recipe: Recipe, counted: dict | None, measured_on: str | None, windows: torch.Tensor | None) -> dict:
    """``report["saturation"]``: the calibration and measured tables (``{layer: {kind: fraction}}``), what was measured
    on (``"eval"``, ``"held_out"`` or None when nothing was), and the flagged sites (``{layer: [kind, ...]}``)."""
    calibration = calibration_table(recipe)
    measured = table(counted) if counted else {}
    return {
        "measured_on": measured_on if measured else None,
        "windows": int(windows.shape[0]) if measured else 0,
        "tokens": int(windows.numel()) if measured else 0,
        "calibration": calibration,
        "measured": measured,
        "flagged": flagged(measured, calibration),
        "rule": f"flagged when measured > min(max({FLAG_RATIO:g} x calibration, {FLAG_FLOOR:g}), {FLAG_CEILING:g})",
    }


def warning(sat: dict) -> str | None:
    """One line naming the flagged sites and what to do, or None."""
    names = flagged_names(sat)
    if not names:
        return None
    sites = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    layer, kind = max(
        ((layer, kind) for layer, kinds in sat["flagged"].items() for kind in kinds),
        key=lambda lk: sat["measured"][lk[0]][lk[1]],
    )
    calibration = sat["calibration"].get(layer, {}).get(kind)
    worst = f"up to {sat['measured'][layer][kind]:.2%} of values" + (
        f", {calibration:.2%} on the calibration text" if calibration is not None else ""
    )
    if sat["measured_on"] == "eval":
        where, cause = (
            "the evaluation text",
            "the calibration text is probably unlike the deployment text, or too repetitive",
        )
        fix = "calibrate on text like the deployment text (--calib)"
    else:
        where, cause = (
            "calibration windows held out of the range fitting",
            "the calibration text is too small or too repetitive",
        )
        fix = "calibrate on more, varied text like the deployment text (--calib) and check with --eval"
    return (
        f"saturation: on {where}, int8 q/k/v hit their limits too often at {sites} ({worst}; {sat['rule']}): "
        f"{cause}; {fix}"
    )
