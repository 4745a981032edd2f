"""Layer fallback for W8A8 (``--disable-level``): which Linears stay float, for any frontend.

``Ln`` keeps the n Linears with the widest activation range float. ``auto`` ranks Linears twice (by
loss sensitivity, the first-order loss change of each Linear's W8A8 error from one backward pass,
when the frontend can take gradients; and by the output SQNR of their W8A8 form on the sample),
keeps the ranking whose held-out perplexity is lower with 10% of the Linears float (the point estimates:
the two are measured on the same windows, so their difference is paired and the windows' spread, which the
bound adds, says nothing about which is better), and binary-searches the fewest
float Linears that keep the perplexity increase on held-out calibration windows within
``max_ppl_increase``. The increase is measured on a sample of windows, so the search holds an upper
bound over the per-window NLL differences to the limit, not the point estimate.

Two bounds, on either side of the 10% share. Up to the share, which is the float budget a W8A8 user
accepts, the search asks for twice the 95% margin (``STRICT_Z``): the held-out windows come from the
calibration text and a few of them are optimistic about other text (SmolLM2, 14 windows: 19 float Linears
at held-out +0.92%, 95% bound +1.92%, gave +1.77% on unseen prose and +2.22% on unseen code), so a count
that only the 95% bound passes takes the whole share instead. Beyond the share each float Linear costs
speed, and the one-sided 95% bound (``UPPER_Z``) decides.
"""

import math
from collections.abc import Callable

import torch

from qpass.core.config import QuantConfig
from qpass.core.errors import QpassError
from qpass.core.recipe import Recipe
from qpass.core.sites import LinearSite

MAX_HELD_OUT = 16  # calibration windows held out for the `auto` perplexity search, at most
UPPER_Z = 1.645  # one-sided 95% normal quantile for the bound on the perplexity increase
STRICT_Z = 2 * UPPER_Z  # the bound within the float share: twice the 95% margin (one-sided 99.95%)
FALLBACK_SHARE = 0.10  # `auto` first tries this share of the Linears in float, then searches below or above


def check_level(level: str, linears: int | None, windows: int | None) -> None:
    """Refuse a W8A8 ``disable_level`` that ``linears`` quantizable Linears or ``windows`` calibration windows cannot
    satisfy (None: not known yet): asked before any calibration run, and again where the level is applied."""
    if level == "auto" and windows is not None and windows < 2:
        raise QpassError(
            f"--disable-level auto: needs at least 2 calibration windows (one is held out), got {windows}; "
            "give more calibration text or raise --calib-samples"
        )
    if level.startswith("L") and linears is not None and int(level[1:]) > linears:
        raise QpassError(
            f"--disable-level {level}: the model has only {linears} quantizable Linears; use at most L{linears}"
        )


def split_held_out(windows: torch.Tensor, config: QuantConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(calibration windows, held-out windows)``; only ``auto`` holds windows out: the last quarter, at
    most ``MAX_HELD_OUT``. The windows run in text order, so the held-out ones come from the last
    modules of the calibration text, which calibration never sees: an estimate for unseen text.
    (Windows spread evenly instead sit beside calibration windows of the same modules; on SmolLM2 that
    estimated +1.35% for a choice that gave +2.18% on prose and +2.71% on code.)"""
    if config.disable_level != "auto":
        return windows, None
    check_level(config.disable_level, None, windows.shape[0])
    held = max(1, min(MAX_HELD_OUT, windows.shape[0] // 4))
    return windows[:-held], windows[-held:]


def _widest_ranges(level: str, linears: list[LinearSite], stats: dict) -> dict[str, str]:
    """``Ln``: the n Linears with the widest activation range (``max|x| / std``) float, with why."""
    n, n_all = int(level[1:]), len(linears)
    check_level(level, n_all, None)
    ranked = _ranked([s.module for s in linears], stats, "range")[:n]
    return {name: f"{level}: {_figure('range', name, stats)}, rank {i + 1} of {n_all}" for i, name in enumerate(ranked)}


# a ranking -> the per-Linear statistic it sorts by, whether a higher value is more sensitive, its name, its format
MEASURES = {
    "loss": ("loss_sensitivity", True, "loss sensitivity", "{:.3g}"),  # first-order loss change of its W8A8 error
    "sqnr": ("output_sqnr_db", False, "output SQNR", "{:.1f} dB"),  # its W8A8 form's, on the calibration sample
    "range": ("range_ratio", True, "activation range max|x|/std", "= {:.1f}"),  # what the Ln levels rank by
}


def _ranked(names: list[str], stats: dict, ranking: str) -> list[str]:
    """``names`` most sensitive first by ``ranking`` (a key of ``MEASURES``); ties in name order."""
    key, higher, _, _ = MEASURES[ranking]
    return sorted(names, key=lambda n: (-stats[key][n] if higher else stats[key][n], n))


def _rankings(linears: list[LinearSite], stats: dict) -> dict[str, list[LinearSite]]:
    """The Linears most sensitive first, by each measure the calibration has: loss sensitivity (where the frontend
    took gradients), output SQNR."""
    by_name = {s.module: s for s in linears}
    names = ("loss", "sqnr") if MEASURES["loss"][0] in stats else ("sqnr",)
    return {r: [by_name[n] for n in _ranked(list(by_name), stats, r)] for r in names}


def increase_bound(diff: torch.Tensor, z: float = UPPER_Z) -> tuple[float, float]:
    """``(perplexity increase %, its one-sided upper bound %)`` from per-window NLL differences ``diff [N]``
    (quantized minus float, equal-length windows), the bound ``z`` standard errors above the mean NLL
    difference (95% for ``UPPER_Z``); the bound is the estimate when N < 2."""
    mean = float(diff.mean())
    se = float(diff.std()) / math.sqrt(diff.numel()) if diff.numel() > 1 else 0.0
    return (math.exp(mean) - 1.0) * 100.0, (math.exp(mean + z * se) - 1.0) * 100.0


def choose_float_linears(
    recipe: Recipe, linears: list[LinearSite], held: torch.Tensor | None, nll: Callable, batch_size: int
) -> tuple[dict[str, str], list[dict]]:
    """``({module: why it stays float}, search log)`` for ``recipe.config.disable_level``.

    ``nll(recipe_or_None, windows, batch_size, desc)`` gives the per-window NLL of the frontend's model, float for None
    (:meth:`qpass.core.frontend.Frontend.window_nll`).
    """
    config = recipe.config
    level = config.disable_level
    n_all = len(linears)
    if level == "L0":
        return {}, []
    stats = recipe.stats["w8a8"]
    if level != "auto":
        return _widest_ranges(level, linears, stats), []
    target = config.max_ppl_increase
    nll_float = nll(None, held, batch_size, "fallback float")
    ppl_float = math.exp(float(nll_float.mean()))
    log, estimates, strict = [], {}, {}

    def measure(names: list[str], label: str) -> float:
        trial = recipe.replace(w8a8={**recipe.w8a8, "float_linears": {n: "trial" for n in names}})
        diff = nll(trial, held, batch_size, f"fallback {label}") - nll_float
        inc, upper = increase_bound(diff)
        strict[label] = increase_bound(diff, STRICT_Z)[1]
        log.append(_step(label, len(names), inc, upper, strict[label]))
        estimates[label] = inc
        return upper

    # Cheap sensitivity rankings, most sensitive first; the one whose estimate is lower with the first
    # FALLBACK_SHARE of the Linears float is searched (SmolLM2, 14 calibration windows: the bounds chose
    # sqnr, +0.56% against loss's +0.21% at 21 float; the search then stopped at 19 sqnr-ranked Linears, which
    # measured +2.08% / +2.19% on unseen prose / code, where 21 loss-ranked ones measure +1.42% / +1.55%).
    rankings = _rankings(linears, stats)
    cap = max(1, math.ceil(FALLBACK_SHARE * n_all))
    tried: dict[int, float] = {0: measure([], "none 0")}
    if strict["none 0"] > target:
        at_cap = {name: measure([s.module for s in r[:cap]], f"{name} {cap}") for name, r in rankings.items()}
        best = min(at_cap, key=lambda name: estimates[f"{name} {cap}"])
        tried[cap] = at_cap[best]
    else:
        best = next(iter(rankings))
    ranked = rankings[best]

    def label(k: int) -> str:
        return f"{best} {k}" if k else "none 0"

    def within(k: int) -> bool:
        """Whether k float Linears pass: the strict bound up to the share, the 95% bound beyond it."""
        if k not in tried:
            tried[k] = measure([s.module for s in ranked[:k]], label(k))
        return (strict[label(k)] if k <= cap else tried[k]) <= target

    def fewest(lo: int, hi: int) -> int:
        """The fewest passing count in (lo, hi], given that lo fails and hi passes."""
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if within(mid):
                hi = mid
            else:
                lo = mid
        return hi

    if within(0):
        k = 0
    elif within(cap):
        k = fewest(0, cap)
    elif tried[cap] <= target:  # only the 95% bound passes: the whole share
        k = cap
    elif within(n_all):
        k = fewest(cap, n_all)
    else:  # not reachable by keeping Linears float: take the best tried
        k = min(tried, key=lambda j: (tried[j], j))
    outcome = (
        f"{k} float Linears keep held-out perplexity at {estimates[label(k)]:+.2f}%, upper bounds 95% "
        f"{tried[k]:+.2f}% ({'within' if tried[k] <= target else 'NOT within'} {target}%) and 99.95% "
        f"{strict[label(k)]:+.2f}%"
    )
    floats = {
        s.module: f"auto: {best} sensitivity rank {i + 1} of {n_all} ({_figures(s.module, stats)}); {outcome}"
        for i, s in enumerate(ranked[:k])
    }
    return floats, [{"held_out_windows": int(held.shape[0]), "ppl_float": ppl_float, "ranking": best}, *log]


def _step(label: str, count: int, increase: float, upper: float, strict: float) -> dict:
    """One trial of the search, as its log records it."""
    return {
        "ranking": label.split(" ")[0],
        "float_linears": count,
        "ppl_increase_pct": round(increase, 4),
        "upper_95_pct": round(upper, 4),
        "upper_strict_pct": round(strict, 4),
    }


def _figures(module: str, stats: dict) -> str:
    """A Linear's sensitivity figures, for why it stays float."""
    loss = stats.get("loss_sensitivity", {}).get(module, float("nan"))
    return f"loss sensitivity {loss:.3g}, output SQNR {stats['output_sqnr_db'][module]:.1f} dB"


def _figure(ranking: str, module: str, stats: dict) -> str:
    """``module``'s figure of the measure ``ranking`` (a key of ``MEASURES``), in words."""
    key, _, name, form = MEASURES[ranking]
    return f"{name} {form.format(stats[key][module])}"


def per_linear(recipe: Recipe) -> tuple[str | None, list[dict]]:
    """``(the ranking the rows are ordered by, or None, one row per W8A8 Linear)``, for the report.

    A row: ``name``, ``mode`` (``static``, ``dynamic`` or ``float``), ``rank`` (1 the most sensitive, None where
    nothing ranked the Linears), ``reason`` in words, and the figures calibration measured for the Linear
    (``loss_sensitivity``, ``output_sqnr_db``, ``range_ratio``; absent where not measured). The rows are ranked by the
    measure that decided: the one the ``auto`` search chose, the activation range for ``Ln``, the output SQNR for
    ``L0`` (measured, though no search ran). Dynamic W8A8 measures nothing per Linear and ranks none; so does a recipe
    whose search did not record its ranking (an older qpass), whose float Linears keep the recipe's own reason.
    """
    config, stats, floats = recipe.config, recipe.stats.get("w8a8", {}), recipe.float_linears
    names = sorted({*recipe.w8a8_linears(), *floats})
    level, n_all = config.disable_level, len(names)
    if config.w8a8 == "dynamic":
        why = "dynamic: --w8a8 dynamic (activations per token at run time); no sensitivity measured, no search ran"
        return None, [
            {"name": n, "mode": "float", "rank": None, "reason": f"float: {floats[n]}"}
            if n in floats
            else {"name": n, "mode": "dynamic", "rank": None, "reason": why}
            for n in names
        ]
    search = stats.get("search") or [{}]
    ranking = {"L0": "sqnr", "auto": search[0].get("ranking")}.get(level, "range")
    if ranking is not None and not all(n in stats.get(MEASURES[ranking][0], {}) for n in names):
        ranking = None  # a recipe without this figure for every Linear: nothing to rank by
    order = names if ranking is None else _ranked(names, stats, ranking)
    kept = sum(n in floats for n in names)
    rows = []
    for rank, name in enumerate(order, start=1):
        figure = None if ranking is None else f"{_figure(ranking, name, stats)}, rank {rank} of {n_all}"
        if name in floats:
            why = floats[name]
            if figure is None or level == "L0":  # nothing of ours explains it: the recipe's own reason
                reason = f"float: {why}"
            elif level == "auto":
                reason = f"kept float by the search: {figure}"
            else:
                reason = f"fell back: level {level}: {figure}"
        elif figure is None:
            reason = "static: not ranked (the recipe, of an older qpass, records no sensitivity ranking)"
        elif level == "L0":
            reason = f"static: {figure}; --disable-level L0, no search ran"
        elif level == "auto":
            reason = f"static: {figure}; the search kept the {kept} most sensitive float"
        else:
            reason = f"static: {figure}, not among the {level[1:]} widest ({level})"
        measured = {key: stats[key][name] for key, *_ in MEASURES.values() if name in stats.get(key, {})}
        row = {"name": name, "mode": "float" if name in floats else "static", "rank": rank if figure else None}
        rows.append({**row, "reason": reason, **measured})
    return ranking, rows


def smoothing_hint(recipe: Recipe) -> str | None:
    """A one-line warning when W8A8 without smoothing keeps more than ``FALLBACK_SHARE`` of the Linears float.

    SmolLM2 from 14 calibration windows: without smoothing and with min-max ranges, all-int8 lost 81% on held-out
    text and ``auto`` kept 60 of 210 Linears float; with ``--anti-method m3 --act-method 3``, 19
    (docs/benchmarks.md)."""
    if not recipe.config.w8a8 or recipe.config.anti_method is not None:
        return None
    floats, total = len(recipe.float_linears), len(recipe.stats.get("w8a8", {}).get("range_ratio", {}))
    if not total or floats <= FALLBACK_SHARE * total:
        return None
    return (
        f"W8A8: {floats} of {total} Linears stay float, without smoothing; smoothing usually lets far fewer stay "
        "float: add --anti-method m3 --act-method 3"
    )
