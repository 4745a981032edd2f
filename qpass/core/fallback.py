"""Layer fallback for W8A8 (``--disable-level``): which Linears stay float, for any frontend.

``Ln`` keeps the n Linears with the widest activation range float. ``auto`` ranks Linears twice (by loss sensitivity,
the squared first-order loss change of each Linear's W8A8 error from one backward pass, where the frontend can take
gradients; and by the output SQNR of their W8A8 form on the sample) and measures each trial by the per-token KL
divergence of its next-token distribution from the float model's on the held-out calibration windows, read as a
perplexity increase (``exp(mean KL) - 1``). It keeps the ranking whose estimate is lower with 10% of the Linears
float (both are measured on the same windows, so their difference is paired), then binary-searches the fewest float
Linears whose one-sided 95% bound over the windows passes, as below, against ``max_ppl_increase``. Where the
float Linears it keeps leave the bound over half the limit, a second step gives the Linears ranked next per-token
(dynamic) activations in an otherwise static model: the next 10%, then twice as many, until the bound is within half
the limit (:func:`_choose_dynamic`; not with ``--static-only``). Per-token activations cost a reduction per token at
run time, not a float GEMM, and they carry to text unlike the calibration's: SmolLM2 (W8A8 + FAQuant + C8) from 14
windows of docstrings, 21 float Linears: +1.52% / +2.85% on unseen prose / code all others static, +0.52% / +0.93%
with the next 28 per token (docs/benchmarks.md).

Before any trial, ``auto`` gives per-token activations to every Linear whose input is light-tailed
(:func:`_light_tailed`: max|x|/std within sqrt(2 ln N), the reach of N Gaussian values), and every trial keeps them so.
Where no outlier channel sets a static per-tensor range, the bulk's spread does, and text of another kind moves the
bulk, which no measure on the calibration text can see: from 14 windows of release notes, SmolLM2's MLP inputs
(max|x|/std 3.8-5.7 against a reach of 5.5) static cost +3.68% on unseen code, while the held-out notes moved 0.06
points with them per token; with every light-tailed input per token the search's choice costs +1.48%. Where an
outlier sets the range, the bulk has room under it and per-token scales would follow the outlier instead.

Why the divergence and not the held-out perplexity: it weighs every next token by the float model's probability
instead of scoring the one token the text has, so its spread over windows is several times smaller (SmolLM2,
3 held-out windows, 21 float Linears: standard error 0.12 points against 0.57), and it is not optimistic about other
text the way the held-out perplexity was (all-int8: held-out perplexity +3.5%, divergence +5.6%, unseen prose +4.1%
and code +8.2%). With the held-out perplexity the search kept 69 of 210 Linears float on a 14-window file of sources,
where the 21 of the share measured +1.31% / +1.10% on unseen prose / code (docs/benchmarks.md).

The 10% share is the float budget a W8A8 user accepts, and it is spent before accuracy is risked. A count below it
must keep the 95% bound within half the limit (``OTHER_TEXT_MARGIN``): the held-out windows are of the calibration's
kind, and text of another kind costs more (SmolLM2, 14 windows, the fewest count within the full limit: unseen text up
to 1.6x the held-out estimate from docstrings, 2.5x from two modules' sources; docs/benchmarks.md). When no count
below the share passes, the share is kept while its estimate is within the limit, even where its bound is not: a
Linear beyond the share costs speed, and a noisy measure must not buy it. An estimate over the limit at the share
first has the Linears ranked next try per-token activations at the share (the second step); only where the best of
those trials leaves the estimate over the limit too does the search go past the share, where the 95% bound decides
(Python's licence, 7 windows, 1 held out: +4.1% at the share, and the search once kept 51 of 210 float).
"""

import math
from collections.abc import Callable

import torch

from qpass.core.config import QuantConfig
from qpass.core.errors import QpassError
from qpass.core.naming import fused_siblings
from qpass.core.recipe import Recipe
from qpass.core.sites import LinearSite

MAX_HELD_OUT = 16  # calibration windows held out for the `auto` perplexity search, at most
UPPER_Z = 1.645  # one-sided 95% normal quantile for the bound on the perplexity increase
OTHER_TEXT_MARGIN = 2.0  # below the float share, the bound must be within the limit / this (text unlike calibration's)
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
    """``(perplexity increase %, its one-sided upper bound %)`` from per-window figures in nats ``diff [N]`` (NLL
    differences, quantized minus float, or divergences from the float model, over equal-length windows), the bound
    ``z`` standard errors above their mean (95% for ``UPPER_Z``); the bound is the estimate when N < 2."""
    mean = float(diff.mean())
    se = float(diff.std()) / math.sqrt(diff.numel()) if diff.numel() > 1 else 0.0
    return (math.exp(mean) - 1.0) * 100.0, (math.exp(mean + z * se) - 1.0) * 100.0


def choose_fallback(
    recipe: Recipe,
    linears: list[LinearSite],
    held: torch.Tensor | None,
    divergence: Callable | None,
    batch_size: int,
    ppl_float: float | None = None,
) -> tuple[dict[str, str], dict[str, str], list[dict]]:
    """``({module: why it stays float}, {module: why its activations are per token}, search log)`` for
    ``recipe.config.disable_level`` (per-token Linears from ``auto`` only, and not with ``config.static_only``).

    ``divergence(trial_recipe, windows, batch_size, desc)`` gives, per window, the mean per-token KL divergence of the
    trial's next-token distribution from the float model's (:class:`qpass.core.evaluate.Divergence` through
    :meth:`qpass.core.frontend.Frontend.window_nll`), for ``auto`` only; ``ppl_float``, the float model's perplexity
    on the held-out windows, goes in the log.
    """
    config = recipe.config
    level = config.disable_level
    n_all = len(linears)
    if level == "L0":
        return {}, {}, []
    stats = recipe.stats["w8a8"]
    if level != "auto":
        return _widest_ranges(level, linears, stats), {}, []
    target = config.max_ppl_increase
    log, estimates = [], {}

    light = {} if config.static_only else _light_tailed(linears, stats)

    def measure(names: list[str], label: str, dynamic: tuple[str, ...] = ()) -> float:
        per_token = [n for n in (*light, *dynamic) if n not in names]
        trial = recipe.replace(
            w8a8={
                **recipe.w8a8,
                "float_linears": dict.fromkeys(names, "trial"),
                "dynamic_linears": dict.fromkeys(per_token, "trial"),
            }
        )
        inc, upper = increase_bound(divergence(trial, held, batch_size, f"fallback {label}"))
        log.append(_step(label, len(names), inc, upper, len(per_token)))
        estimates[label] = inc
        return upper

    # Cheap sensitivity rankings, most sensitive first; the one whose estimate is lower with the first
    # FALLBACK_SHARE of the Linears float is searched (both are measured on the same windows: the difference is paired).
    rankings = _rankings(linears, stats)
    cap = max(1, math.ceil(FALLBACK_SHARE * n_all))
    below = target / OTHER_TEXT_MARGIN  # what a count below the share must pass
    tried: dict[int, float] = {0: measure([], "none 0")}
    if tried[0] > below:
        at_cap = {name: measure([s.module for s in r[:cap]], f"{name} {cap}") for name, r in rankings.items()}
        best = min(at_cap, key=lambda name: estimates[f"{name} {cap}"])
        tried[cap] = at_cap[best]
    else:
        best = next(iter(rankings))
    ranked = rankings[best]

    def label(k: int) -> str:
        return f"{best} {k}" if k else "none 0"

    def within(k: int, limit: float) -> bool:
        """Whether k float Linears pass: the 95% bound within ``limit``."""
        if k not in tried:
            tried[k] = measure([s.module for s in ranked[:k]], label(k))
        return tried[k] <= limit

    def fewest(lo: int, hi: int, limit: float) -> int:
        """The fewest passing count in (lo, hi], given that lo fails and hi passes."""
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if within(mid, limit):
                hi = mid
            else:
                lo = mid
        return hi

    def per_token_label(k: int, count: int) -> str:  # a trial of the second step (its counts grow: one per label)
        return f"{best} {k}+{count} per-token"

    def per_token_step(k: int) -> dict[str, tuple[int, str]]:
        """The second step with the ``k`` most sensitive Linears float (:func:`_choose_dynamic`)."""
        names = [s.module for s in ranked[:k]]

        def per_token(dynamic: tuple[str, ...]) -> float:
            return measure(names, per_token_label(k, len(dynamic)), dynamic)

        return _choose_dynamic(ranked, k, cap, below, tried[k], per_token, skip=set(light) - set(names))

    chosen = None
    if within(0, below):
        k = 0
    elif within(cap, below):
        k = fewest(0, cap, below)
    elif estimates[label(cap)] <= target:  # the share, rather than Linears bought against noise beyond it
        k = cap
    elif (
        not config.static_only
        and (chosen := per_token_step(cap))
        and estimates[per_token_label(cap, len(chosen))] <= target
    ):
        k = cap  # per-token activations, rather than float Linears, bring the share's estimate within the limit
    elif within(n_all, target):
        k, chosen = fewest(cap, n_all, target), None
    else:  # not reachable by keeping Linears float: take the best tried
        k, chosen = min(tried, key=lambda j: (tried[j], j)), None
    outcome = (
        f"{k} float Linears keep the held-out divergence from the float model at {estimates[label(k)]:+.2f}% "
        f"perplexity, upper bound 95% {tried[k]:+.2f}% ({'within' if tried[k] <= target else 'NOT within'} {target}%"
        f"{f'; a count below the float share of {cap} must be within {below:g}%' if k < cap else ''})"
        + (
            f"; with the next {len(chosen)} per-token, {estimates[per_token_label(k, len(chosen))]:+.2f}%: "
            f"within {target}%"
            if chosen
            else ""
        )
    )
    floats = {
        s.module: f"auto: {best} sensitivity rank {i + 1} of {n_all} ({_figures(s.module, stats)}); {outcome}"
        for i, s in enumerate(ranked[:k])
    }
    dynamic = {name: why for name, why in light.items() if name not in floats}
    if chosen is None and tried[k] > below and not config.static_only:
        chosen = per_token_step(k)
    dynamic.update(
        {
            name: f"auto: {best} sensitivity rank {rank} of {n_all} ({_figures(name, stats)}); {why}"
            for name, (rank, why) in (chosen or {}).items()
        }
    )
    head = {"held_out_windows": int(held.shape[0]), "measure": "kl", "ppl_float": ppl_float, "ranking": best}
    return floats, dynamic, [head, *log]


def _light_tailed(linears: list[LinearSite], stats: dict) -> dict[str, str]:
    """``{module: why}`` for the Linears whose input is light-tailed: its range over the calibration text
    (``max|x| / std``) within what the largest of as many Gaussian values reaches (``sqrt(2 ln N)``), so no outlier
    channel sets a static range; the bulk's spread does, and that spread is what text of another kind changes. Such
    a Linear gets per-token activations, which need no range and lose little where no outlier dominates a token
    (fused siblings share an input, so they go together). SmolLM2, 14 windows of IDLE's release notes, 21 float:
    the MLP inputs (max|x|/std 3.8-5.7, bound 5.5) set static cost +3.68% on unseen code; with the light-tailed
    inputs per token, +1.48% (docs/benchmarks.md)."""
    return {s.module: f"auto: {why}" for s in linears if (why := _light_why(s.module, stats))}


def _light_why(module: str, stats: dict) -> str | None:
    """Why ``module``'s input counts as light-tailed (:func:`_light_tailed`), or None where it does not (or the stats,
    of an older qpass, lack ``gaussian_reach``)."""
    ratio, bound = stats.get("range_ratio", {}).get(module), stats.get("gaussian_reach", {}).get(module)
    if ratio is None or bound is None or ratio > bound:
        return None
    return (
        f"light-tailed input (max|x|/std {ratio:.1f} within {bound:.1f}, the reach of as many Gaussian values): "
        "per-token activations, as a static range fitted to the bulk clips text of another kind"
    )


def _choose_dynamic(
    ranked: list[LinearSite], k: int, cap: int, below: float, upper_k: float, measure: Callable, skip: set[str]
) -> dict[str, tuple[int, str]]:
    """The search's second step: with the ``k`` most sensitive Linears float and their 95% bound ``upper_k`` over
    ``below``, the Linears ranked next (but those in ``skip``, per-token already) get per-token activations: the first
    ``cap``, then twice as many, and so on, until the bound is within ``below`` (else the count with the lowest bound,
    when it is below ``upper_k``). A Linear's fused siblings (q/k/v, gate/up: one quant type in vLLM and MindIE) join
    it unless float. ``measure(dynamic names)`` gives a trial's bound. ``{name: (sensitivity rank, why)}``."""
    rank = {s.module: i + 1 for i, s in enumerate(ranked)}
    floats = {s.module for s in ranked[:k]}
    rest = [s.module for s in ranked[k:] if s.module not in skip]
    trials: dict[int, tuple[float, list[str]]] = {}
    d = cap
    while True:
        names = []
        for name in rest[:d]:
            names += [m for m in fused_siblings(name) if m in rank and m not in floats | skip and m not in names]
        trials[d] = (measure(tuple(names)), names)
        if trials[d][0] <= below or d >= len(rest):
            break
        d = min(2 * d, len(rest))
    d = next((j for j, (upper, _) in trials.items() if upper <= below), None)
    if d is None:
        d = min(trials, key=lambda j: (trials[j][0], j))
        if trials[d][0] >= upper_k:
            return {}
    upper, names = trials[d]
    why = (
        f"{len(names)} per-token Linears after {k} float bring the upper bound 95% from {upper_k:+.2f}% to "
        f"{upper:+.2f}% ({'within' if upper <= below else 'NOT within'} {below:g}%)"
    )
    seeds = set(rest[:d])
    return {
        n: (rank[n], why if n in seeds else f"fused with a per-token sibling; {why}")
        for n in sorted(names, key=rank.get)
    }


def _step(label: str, count: int, increase: float, upper: float, dynamic: int = 0) -> dict:
    """One trial of the search, as its log records it: the divergence's perplexity-equivalent increase and bound."""
    return {
        "ranking": label.split(" ")[0],
        "float_linears": count,
        "dynamic_linears": dynamic,
        "ppl_increase_pct": round(increase, 4),
        "upper_95_pct": round(upper, 4),
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
    dynamic = recipe.dynamic_linears
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
        elif name in dynamic and level == "auto" and (light := _light_why(name, stats)) and not config.static_only:
            reason = f"dynamic: {light}" + (f"; {figure}" if figure else "")
        elif name in dynamic:
            reason = f"dynamic: per-token activations, chosen by the search: {figure}" if figure else dynamic[name]
        elif figure is None:
            reason = "static: not ranked (the recipe, of an older qpass, records no sensitivity ranking)"
        elif level == "L0":
            reason = f"static: {figure}; --disable-level L0, no search ran"
        elif level == "auto":
            reason = f"static: {figure}; the search kept the {kept} most sensitive float" + (
                f" and gave the next {len(dynamic)} per-token activations" if dynamic else ""
            )
        else:
            reason = f"static: {figure}, not among the {level[1:]} widest ({level})"
        measured = {key: stats[key][name] for key, *_ in MEASURES.values() if name in stats.get(key, {})}
        mode = "float" if name in floats else "dynamic" if name in dynamic else "static"
        row = {"name": name, "mode": mode, "rank": rank if figure else None}
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
