"""Calibration, for any frontend: observe the float model, choose ranges, smooth, and make the recipe.

The order matters and is fixed here:

1. with an anti-method, a float run observes the smoothing groups' inputs, and the method's scales
   are computed and folded into a copy of the float weights (:mod:`qpass.core.smoothing`);
2. one run of the (smoothed) model observes q/k/v (FAQuant / C8; v_proj -> o_proj smoothing changes
   V, so V is observed after it) and, with W8A8, every Linear input;
3. ranges are chosen per channel (attention) or per tensor (Linear inputs, :mod:`qpass.core.ranges`);
4. with W8A8, the fallback search decides which Linears stay float (:mod:`qpass.core.fallback`).
"""

import math
from collections.abc import Callable

import torch

from qpass.core.config import QuantConfig
from qpass.core.errors import QpassError
from qpass.core.evaluate import Divergence
from qpass.core.fallback import choose_fallback, split_held_out
from qpass.core.frontend import Frontend
from qpass.core.int8 import affine_qparams, saturated, sqnr_db
from qpass.core.observers import Observer
from qpass.core.ranges import channel_range, linear_input_qparams, rotary_range
from qpass.core.recipe import Recipe, geometry, key_smooth_key, linear_key, site_key, smooth_key
from qpass.core.sites import AttentionSite
from qpass.core.smoothing import apply_smoothing, key_smoothing_scale, smoothing_scales
from qpass.core.w8a8 import output_sqnr_db

SAMPLE_TOKENS = 2048  # tokens kept per observed attention value for the range search
KEY_SAMPLE_TOKENS = 1024  # tokens of q and k kept per site for key smoothing's search (scores: tokens^2 per head)
LINEAR_SAMPLE_TOKENS = 512  # tokens kept per Linear input for smoothing searches, histograms and SQNR
# what static W8A8 calibration records per Linear (recipe stats["w8a8"]): max|x|/std of its input, sqrt(2 ln N) for
# the N values seen (fallback's light-tail rule), the activation range method used, its W8A8 output SQNR
LINEAR_STATS = ("range_ratio", "gaussian_reach", "act_method_used", "output_sqnr_db")


def calibrate(frontend: Frontend, windows: torch.Tensor, config: QuantConfig, batch_size: int = 4) -> Recipe:
    """Observe ``windows [N, W]`` through ``frontend``, ``batch_size`` windows a forward pass, and choose every scale
    and offset ``config`` asks for; one decoder layer at a time (:func:`calibrate_by_layer`) where the frontend runs
    the model so (``frontend.layerwise``)."""
    if frontend.layerwise:
        return calibrate_by_layer(frontend, windows, config, batch_size)
    sites = frontend.attention_sites()
    if config.w8a8:
        return _calibrate_w8a8(frontend, sites, windows, config, batch_size)
    rotary, keys = _rotary(frontend, config), key_smoothing_sites(frontend, sites, config)
    observers = attention_observers(sites, config, windows, rotary, keys)
    if observers:  # none for a dynamic cache without key smoothing: its scales are computed as it is written
        frontend.observe(windows, observers, batch_size)
    tensors, stats = attention_qparams(sites, observers, config, rotary, keys)
    return Recipe(config, geometry(sites), tensors, stats)


def calibrate_by_layer(frontend, windows: torch.Tensor, config: QuantConfig, batch_size: int = 4) -> Recipe:
    """:func:`calibrate` for a frontend that runs the model one decoder layer at a time: its ``observe_layers(windows,
    observers, batch_size)`` yields each layer's index once that layer has seen every window. Each site's ranges are
    chosen as soon as its layer is done and its observers dropped, so the statistics held grow with one layer, not
    with depth; the recipe is :func:`calibrate`'s (the same observers, the same :func:`attention_qparams`, site by
    site). W8A8 too (:func:`_calibrate_w8a8_by_layer`): smoothing and the Linears' ranges layer by layer; ``Ln``
    ranks every Linear at the end, from the figures kept per Linear."""
    if config.w8a8:
        return _calibrate_w8a8_by_layer(frontend, windows, config, batch_size)
    sites, rotary = {s.layer: s for s in frontend.attention_sites()}, _rotary(frontend, config)
    keys = key_smoothing_sites(frontend, list(sites.values()), config)
    observers = attention_observers(list(sites.values()), config, windows, rotary, keys)
    if not observers:  # a dynamic cache without key smoothing: nothing to observe
        return Recipe(config, geometry(sites.values()), *attention_qparams(list(sites.values()), {}, config, keys=keys))
    tensors, stats = {}, {}
    for layer in frontend.observe_layers(windows, observers, batch_size):
        site = sites[layer]
        done = _site_observers(site, observers)
        site_tensors, site_stats = attention_qparams([site], done, config, rotary, keys)
        tensors.update(site_tensors)
        for key, table in site_stats.items():
            stats.setdefault(key, {}).update(table)
        del done  # before the next layer runs
    return Recipe(config, geometry(sites.values()), tensors, stats)


def _rotary(frontend, config: QuantConfig) -> torch.Tensor | None:
    """The RoPE frequencies ``--max-context`` widens q and k's ranges with; None without ``--max-context``."""
    if config.max_context is None:
        return None
    frequencies = frontend.rotary()
    if frequencies is None:
        raise QpassError(
            f"--max-context {config.max_context}: qpass reads no RoPE frequencies from this model (an ONNX graph "
            "other than GroupQueryAttention's, no RoPE, or a RoPE it does not know); calibrate with --window as long "
            "as the context instead"
        )
    return frequencies


def attention_observers(
    sites: list[AttentionSite],
    config: QuantConfig,
    windows: torch.Tensor,
    rotary: torch.Tensor | None = None,
    keys: dict[int, int | str] | None = None,
) -> dict[str, Observer]:
    """One observer per site value that ``config`` quantizes over ``windows [N, W]``, keyed by the value's name in
    the IR; with ``rotary`` (:func:`_rotary`), those of q and k after RoPE also keep their channel pairs' reach per
    angle (:func:`qpass.core.ranges.rotary_range`). ``keys`` (:func:`key_smoothing_sites`): q's and k's observers at
    each site the dynamic cache's key smoothing applies to, k's with its RoPE pairs' reach where it has RoPE."""
    stride = max(1, windows.numel() // SAMPLE_TOKENS)

    def pairs(site: AttentionSite, kind: str) -> tuple[int, int] | None:
        turned = rotary.numel() if rotary is not None else 0
        rope = turned and site.rope and kind in ("q", "k") and 2 * turned <= site.head_dim
        return (site.head_dim, turned) if rope else None

    observers = {
        getattr(s, kind): Observer(stride, SAMPLE_TOKENS, windows.shape[1], pairs(s, kind))
        for s in sites
        for kind in config.observed_kinds
    }
    key_stride = max(1, windows.numel() // KEY_SAMPLE_TOKENS)
    for s in sites:
        turned = (keys or {}).get(s.layer)
        if isinstance(turned, int):  # the same tokens kept of both: the search scores them (key_smoothing_scale)
            observers[s.k] = Observer(key_stride, KEY_SAMPLE_TOKENS, None, (s.head_dim, turned) if turned else None)
            observers[s.q] = Observer(key_stride, KEY_SAMPLE_TOKENS)
    return observers


def key_smoothing_sites(frontend, sites: list[AttentionSite], config: QuantConfig) -> dict[int, int | str]:
    """Per site layer, whether the dynamic cache's key smoothing (:mod:`qpass.core.smoothing`) applies there: the
    RoPE pairs' offset ``turned`` (0 without RoPE), or why it does not. It needs K and Q each from a Linear of their
    own whose output rows are the heads' channels (so the scale folds into them), no norm between those Linears and
    the attention (a per-head norm would undo it), and RoPE in the rotate-half layout qpass reads frequencies for (a
    pair's two channels share a scale). Empty for any other cache."""
    if config.kv_cache != "dynamic":
        return {}
    state, rotary = frontend.state_dict(), None
    keys: dict[int, int | str] = {}
    for site in sites:
        q, k = site.q_from, site.k_from
        shapes = {p: tuple(state[p].shape) for p in (q, k) if p in state}
        if site.qk_norm:
            keys[site.layer] = "q and k are normed per head after their projections"
        elif q == k or len(shapes) != 2 or not q.endswith(".weight") or not k.endswith(".weight"):
            keys[site.layer] = "q and k do not come from Linears of their own"
        elif shapes[q][0] != site.num_heads * site.head_dim or shapes[k][0] != site.num_kv_heads * site.head_dim:
            keys[site.layer] = "the q and k projections' rows are not the heads' channels"
        elif site.rope:
            rotary = frontend.rotary() if rotary is None else rotary
            turned = 0 if rotary is None else rotary.numel()
            ok = 0 < 2 * turned <= site.head_dim
            keys[site.layer] = turned if ok else "its RoPE is not one qpass reads (the rotate-half layout)"
        else:
            keys[site.layer] = 0
    return keys


def _site_observers(site: AttentionSite, observers: dict[str, Observer]) -> dict[str, Observer]:
    """The observers of ``site``'s q, k and v, taken out of ``observers`` (its layer is done)."""
    return {name: observers.pop(name) for name in (site.q, site.k, site.v) if name in observers}


def attention_qparams(
    sites: list[AttentionSite],
    observers: dict[str, Observer],
    config: QuantConfig,
    rotary: torch.Tensor | None = None,
    keys: dict[int, int | str] | None = None,
) -> tuple[dict, dict]:
    """The recipe tensors of FAQuant (``[heads, head_dim]``) and C8 (``[kv_heads * head_dim]``), and per-site SQNR
    and saturation (the fraction of the kept sample at the int8 limits, :mod:`qpass.core.saturation`).

    ``rotary``: the RoPE frequencies per channel pair (:func:`_rotary`, with ``config.max_context``); with them, the
    ranges of q and k after RoPE at a site that has RoPE are widened to hold at every position below
    ``config.max_context``, not only those the calibration windows reached (:func:`qpass.core.ranges.rotary_range`).

    ``keys`` (:func:`key_smoothing_sites`): the key smoothing scale of each site it applies to where the search
    chose one, and in the stats (``key_smoothing``) each site's exponent (0: none) or why it does not apply."""
    tensors, sqnr, zero, sat, key_stats = {}, {}, {}, {}, {}
    for site in sites:
        per_site, per_site_sat = {}, {}
        if site.layer in (keys or {}):
            turned = keys[site.layer]
            if isinstance(turned, int):
                group = site.num_heads // site.num_kv_heads
                scale, alpha = key_smoothing_scale(observers[site.k], observers[site.q], site.head_dim, group)
                if alpha > 0:  # 0: none helped on the sample; the site keeps its weights
                    tensors[key_smooth_key(site.layer)] = scale
            key_stats[str(site.layer)] = alpha if isinstance(turned, int) else turned
        for kind in config.observed_kinds:
            obs = observers[getattr(site, kind)]
            zero_channels = int(((obs.min == 0) & (obs.max == 0)).sum())
            if zero_channels == obs.channels:
                raise QpassError(
                    f"calibration: {kind} of attention layer {site.layer} ({site.prefix or site.attention}) was 0 "
                    "in every channel over the whole calibration text, so it has no range to quantize; "
                    "check the model and the calibration text"
                )
            if zero_channels:  # they get scale 1 (any scale round-trips 0): flagged in the report
                zero.setdefault(str(site.layer), {})[kind] = zero_channels
            heads = site.num_heads if kind == "q" else site.num_kv_heads
            lo, hi = channel_range(obs, config.observer, config.symmetric, config.percentile)  # [C]
            if rotary is not None and site.rope and kind in ("q", "k"):
                lo, hi = rotary_range(obs, lo, hi, site.head_dim, rotary, config.max_context)
            scale, offset = affine_qparams(lo, hi, config.symmetric)
            if config.fa_quant:
                tensors[site_key(site.layer, f"fa_{kind}", "scale")] = scale.reshape(heads, site.head_dim)
                tensors[site_key(site.layer, f"fa_{kind}", "offset")] = offset.reshape(heads, site.head_dim)
            if config.kv_cache == "static" and kind in ("k", "v"):
                tensors[site_key(site.layer, f"kv_{kind}", "scale")] = scale.clone()
                tensors[site_key(site.layer, f"kv_{kind}", "offset")] = offset.clone()
            per_site[kind] = round(sqnr_db(obs.sample(), scale, offset), 3)
            per_site_sat[kind] = float(saturated(obs.sample(), scale, offset, config.symmetric).float().mean())
        sqnr[str(site.layer)], sat[str(site.layer)] = per_site, per_site_sat
    extra = {**({"zero_range_channels": zero} if zero else {}), **({"key_smoothing": key_stats} if key_stats else {})}
    return tensors, {"sqnr_db": sqnr, "saturation": sat, **extra}


def _calibrate_w8a8(
    frontend: Frontend, sites: list[AttentionSite], windows: torch.Tensor, config: QuantConfig, batch_size: int
) -> Recipe:
    linears = _linears(frontend)
    calib, held = split_held_out(windows, config)
    stride = max(1, calib.numel() // LINEAR_SAMPLE_TOKENS)
    doc, tensors, w8a8_stats = _w8a8_doc(config, linears), {}, {}
    state, smoothed = frontend.state_dict(), None
    if config.anti_method is not None:
        groups = _smoothing_groups(frontend, linears, config)
        group_obs = {name: Observer(stride, LINEAR_SAMPLE_TOKENS) for name in sorted({g.input for g in groups})}
        frontend.observe(calib, group_obs, batch_size, desc="calibrate (smoothing)")
        chosen = _smooth(config, list(enumerate(groups)), group_obs, state, tensors, doc)
        w8a8_stats["smooth"] = {"groups": len(groups), **_chosen(chosen)}
        state = smoothed = apply_smoothing(state, doc["smooth"], tensors)
    dynamic = config.w8a8 == "dynamic"  # no Linear input ranges: each token's scale is computed at run time
    inputs = set() if dynamic else {s.input for s in linears}
    linear_obs = {name: Observer(stride, LINEAR_SAMPLE_TOKENS) for name in sorted(inputs)}
    rotary, keys = _rotary(frontend, config), key_smoothing_sites(frontend, sites, config)
    attention_obs = attention_observers(sites, config, calib, rotary, keys)
    if linear_obs or attention_obs:
        frontend.observe(calib, {**linear_obs, **attention_obs}, batch_size, state_dict=smoothed)
    attn_tensors, stats = attention_qparams(sites, attention_obs, config, rotary, keys)
    linear_tensors, per_linear = linear_qparams(linears, linear_obs, state, config)
    tensors.update(linear_tensors)
    return _fallback(
        frontend,
        config,
        sites,
        linears,
        calib,
        held,
        {**attn_tensors, **tensors},
        stats,
        {**w8a8_stats, **per_linear},
        doc,
        batch_size,
    )


def _calibrate_w8a8_by_layer(frontend, windows: torch.Tensor, config: QuantConfig, batch_size: int) -> Recipe:
    """:func:`_calibrate_w8a8` one decoder layer at a time (``frontend.observe_layers``): each layer's smoothing scales
    are computed from its float run and folded into its weights before its calibration run, and its Linears' and
    attention's ranges are chosen, and their observers dropped, as soon as the layer is done. ``--disable-level auto``
    holds windows out as the whole-model path does and measures its trials with the frontend's streamed ``window_nll``
    (the SQNR ranking alone: no backward pass runs layer by layer)."""
    layers = list(frontend.layers())
    sites, linears = [layer.attention for layer in layers], _linears(frontend)
    windows, held = split_held_out(windows, config)
    stride = max(1, windows.numel() // LINEAR_SAMPLE_TOKENS)
    doc, tensors, stats, chosen = _w8a8_doc(config, linears), {}, {}, []
    per_linear = {} if config.w8a8 == "dynamic" else {key: {} for key in LINEAR_STATS}
    state, smoothed = frontend.state_dict(), {}  # smoothed: the layer's smoothed tensors, by name
    groups = _smoothing_groups(frontend, linears, config) if config.anti_method is not None else []
    layer_of = {s.module: layer.index for layer in layers for s in layer.linears}
    layer_groups: dict[int, list] = {}
    for i, g in enumerate(groups):
        layer_groups.setdefault(layer_of[g.consumers[0]], []).append((i, g))

    def smooth(layer: int, peek) -> dict[str, torch.Tensor]:
        entries = layer_groups.get(layer, [])
        if not entries:
            return {}
        group_obs = {g.input: Observer(stride, LINEAR_SAMPLE_TOKENS) for _, g in entries}
        peek(group_obs)
        first = len(doc["smooth"])
        chosen.extend(_smooth(config, entries, group_obs, state, tensors, doc))
        names = {
            f"{m}.{p}" for g in doc["smooth"][first:] for m in (g["prev"], *g["consumers"]) for p in ("weight", "bias")
        }
        smoothed.clear()
        smoothed.update(
            apply_smoothing({n: state[n] for n in sorted(names) if n in state}, doc["smooth"][first:], tensors)
        )
        return dict(smoothed)

    inputs = set() if config.w8a8 == "dynamic" else {s.input for s in linears}  # dynamic: no Linear input ranges
    observers = {name: Observer(stride, LINEAR_SAMPLE_TOKENS) for name in sorted(inputs)}
    rotary, keys = _rotary(frontend, config), key_smoothing_sites(frontend, sites, config)
    observers.update(attention_observers(sites, config, windows, rotary, keys))  # each popped when its layer is done
    layer_at = {layer.index: layer for layer in layers}
    for index in frontend.observe_layers(windows, observers, batch_size, smooth=smooth if groups else None):
        layer = layer_at[index]
        done = _site_observers(layer.attention, observers)
        site_tensors, site_stats = attention_qparams([layer.attention], done, config, rotary, keys)
        tensors.update(site_tensors)
        for key, table in site_stats.items():
            stats.setdefault(key, {}).update(table)
        names = dict.fromkeys(s.input for s in layer.linears if s.input in observers)  # none for dynamic W8A8
        inputs = {name: observers.pop(name) for name in names}
        layer_state = {
            n: smoothed[n] if n in smoothed else state[n] for n in (f"{s.module}.weight" for s in layer.linears)
        }
        layer_tensors, layer_stats = linear_qparams(list(layer.linears), inputs, layer_state, config)
        tensors.update(layer_tensors)
        for key, table in layer_stats.items():
            per_linear[key].update(table)
        del done, inputs, layer_state
        smoothed.clear()
    w8a8_stats = {"smooth": {"groups": len(groups), **_chosen(chosen)}} if groups else {}
    return _fallback(
        frontend, config, sites, linears, windows, held, tensors, stats, {**w8a8_stats, **per_linear}, doc, batch_size
    )


def _linears(frontend) -> list:
    linears = frontend.linear_sites()
    if not linears:
        raise QpassError(
            "--w8a8: found no Linear with a parameter weight outside the LM head; "
            "this model has nothing W8A8 can quantize"
        )
    return linears


def _w8a8_doc(config: QuantConfig, linears: list) -> dict:
    """The recipe's ``w8a8`` section before the smoothing groups and the float Linears are known (dynamic W8A8: with
    the Linears found, which have no qparams to name them)."""
    found = {"linears": sorted(s.module for s in linears)} if config.w8a8 == "dynamic" else {}
    return {
        **found,
        "act_method": config.act_method,
        "anti_method": config.anti_method,
        "alpha": config.alpha,
        "disable_level": config.disable_level,
        "smooth": [],
        "float_linears": {},
    }


def _smoothing_groups(frontend, linears: list, config: QuantConfig) -> list:
    groups = frontend.smoothing_groups(linears)
    if not groups:
        raise QpassError(
            f"--anti-method {config.anti_method}: found no norm or Linear whose output feeds only Linears; "
            "this model has nothing to smooth (drop --anti-method)"
        )
    return groups


def _smooth(
    config: QuantConfig, entries: list, observers: dict[str, Observer], state, tensors: dict, doc: dict
) -> list[dict]:
    """The smoothing scales of ``entries`` (``(recipe index, group)``) into ``tensors`` and ``doc["smooth"]``; what the
    method chose per group."""
    groups = [g for _, g in entries]
    act_method = None if config.w8a8 == "dynamic" else config.act_method  # None: the searches measure per token
    scales, chosen = smoothing_scales(config.anti_method, groups, observers, state, act_method, config.alpha)
    for (i, g), s in zip(entries, scales):
        tensors[smooth_key(i)] = s.contiguous()
        doc["smooth"].append(g.to_recipe(smooth_key(i)))
    return chosen


def linear_qparams(linears: list, observers: dict[str, Observer], state, config: QuantConfig) -> tuple[dict, dict]:
    """Each Linear's W8A8 input qparams (recipe tensors) and its statistics (``LINEAR_STATS`` by module), from the
    observers of the Linears' inputs and their (smoothed) weights ``state``."""
    tensors, per_linear = {}, {key: {} for key in LINEAR_STATS}
    if config.w8a8 == "dynamic":  # nothing to choose: each token's scale is computed at run time
        return tensors, {}
    for site in linears:
        obs = observers[site.input]
        if float(obs.min.min()) == 0.0 == float(obs.max.max()):
            raise QpassError(
                f"calibration: the input of Linear {site.module} was 0 over the whole calibration text, so it "
                "has no range to quantize; check the model and the calibration text"
            )
        scale, offset, used = linear_input_qparams(obs, config.act_method)
        tensors[linear_key(site.module, "scale")], tensors[linear_key(site.module, "offset")] = scale, offset
        weight = state[f"{site.module}.weight"].detach()
        per_linear["range_ratio"][site.module] = round(obs.range_ratio(), 3)
        per_linear["gaussian_reach"][site.module] = round(obs.gaussian_reach(), 3)
        per_linear["act_method_used"][site.module] = used
        per_linear["output_sqnr_db"][site.module] = round(output_sqnr_db(obs.sample(), weight, scale, offset), 3)
    return tensors, per_linear


def _fallback(
    frontend,
    config: QuantConfig,
    sites: list[AttentionSite],
    linears: list,
    calib: torch.Tensor,
    held: torch.Tensor | None,
    tensors: dict,
    stats: dict,
    w8a8_stats: dict,
    doc: dict,
    batch_size: int,
) -> Recipe:
    """The recipe with the Linears ``config.disable_level`` keeps float, and those the ``auto`` search gives per-token
    activations (their qparams dropped)."""
    base = Recipe(config, geometry(sites), tensors, {**stats, "w8a8": w8a8_stats}, doc)
    if config.disable_level == "auto":
        sensitivity = frontend.loss_sensitivity(base, linears, calib[:batch_size])
        if sensitivity is not None:
            w8a8_stats = {**w8a8_stats, "loss_sensitivity": sensitivity}
            base = base.replace(stats={**stats, "w8a8": w8a8_stats})
    divergence, ppl_float = _divergence(frontend, held, batch_size) if config.disable_level == "auto" else (None, None)
    floats, dynamic, search = choose_fallback(base, linears, held, divergence, batch_size, ppl_float)
    if search:
        w8a8_stats = {**w8a8_stats, "search": search}
    # float and per-token Linears have no qparams
    drop = {linear_key(name, part) for name in (*floats, *dynamic) for part in ("scale", "offset")}
    return Recipe(
        config,
        base.sites,
        {k: v for k, v in base.tensors.items() if k not in drop},
        {**stats, "w8a8": w8a8_stats},
        {**doc, "float_linears": floats, **({"dynamic_linears": dynamic} if dynamic else {})},
    )


def _divergence(frontend, held: torch.Tensor, batch_size: int) -> tuple[Callable, float]:
    """The `auto` search's measure: the float model's run over the held-out windows recorded once, then per trial the
    per-window mean KL divergence of the trial's next-token distribution from it; and the float model's perplexity on
    those windows, for the search log."""
    reference = Divergence()
    nll_float = frontend.window_nll(None, held, batch_size, "fallback float", score=reference.record)

    def divergence(trial: Recipe, windows: torch.Tensor, size: int, desc: str) -> torch.Tensor:
        return frontend.window_nll(trial, windows, size, desc, score=reference)

    return divergence, math.exp(float(nll_float.mean()))


def _chosen(chosen: list[dict]) -> dict:
    """What the smoothing method chose per group, as lists (``statistics``/``exponents`` for m3, ``steps`` for m4)."""
    names = {"statistic": "statistics", "exponent": "exponents", "step": "steps"}
    return {names[k]: [c[k] for c in chosen] for k in (chosen[0] if chosen else {})}
