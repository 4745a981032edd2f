"""Calibration, for any frontend: observe the float model, choose ranges, smooth, and make the recipe.

The order matters and is fixed here:

1. with an anti-method, a float run observes the smoothing groups' inputs, and the method's scales
   are computed and folded into a copy of the float weights (:mod:`qpass.core.smoothing`);
2. one run of the (smoothed) model observes q/k/v (FAQuant / C8; v_proj -> o_proj smoothing changes
   V, so V is observed after it) and, with W8A8, every Linear input;
3. ranges are chosen per channel (attention) or per tensor (Linear inputs, :mod:`qpass.core.ranges`);
4. with W8A8, the fallback search decides which Linears stay float (:mod:`qpass.core.fallback`).
"""

import torch

from qpass.core.config import QuantConfig
from qpass.core.errors import QpassError
from qpass.core.fallback import choose_float_linears, split_held_out
from qpass.core.frontend import Frontend
from qpass.core.int8 import saturated, sqnr_db
from qpass.core.observers import Observer
from qpass.core.ranges import channel_qparams, linear_input_qparams
from qpass.core.recipe import Recipe, geometry, linear_key, site_key, smooth_key
from qpass.core.sites import AttentionSite
from qpass.core.smoothing import apply_smoothing, smoothing_scales
from qpass.core.w8a8 import output_sqnr_db

SAMPLE_TOKENS = 2048         # tokens kept per observed attention value for the range search
LINEAR_SAMPLE_TOKENS = 512   # tokens kept per Linear input for smoothing searches, histograms and SQNR


def calibrate(frontend: Frontend, windows: torch.Tensor, config: QuantConfig) -> Recipe:
    """Observe ``windows [N, W]`` through ``frontend`` and choose every scale and offset ``config`` asks for."""
    sites = frontend.attention_sites()
    if config.w8a8:
        return _calibrate_w8a8(frontend, sites, windows, config)
    observers = attention_observers(sites, config, windows.numel())
    if observers:  # none for the dynamic cache alone: its scales are computed as it is written
        frontend.observe(windows, observers, config.batch_size)
    tensors, stats = attention_qparams(sites, observers, config)
    return Recipe(config, geometry(sites), tensors, stats)


def calibrate_by_layer(frontend, windows: torch.Tensor, config: QuantConfig) -> Recipe:
    """:func:`calibrate` for a frontend that runs the model one decoder layer at a time: its ``observe_layers(windows,
    observers, batch_size)`` yields each layer's index once that layer has seen every window. Each site's ranges are
    chosen as soon as its layer is done and its observers dropped, so the statistics held grow with one layer, not
    with depth; the recipe is :func:`calibrate`'s (the same observers, the same :func:`attention_qparams`, site by
    site). W8A8 goes through :func:`calibrate` (its fallback ranks every Linear at once)."""
    sites = {s.layer: s for s in frontend.attention_sites()}
    observers = attention_observers(list(sites.values()), config, windows.numel())
    if config.w8a8 or not observers:
        return calibrate(frontend, windows, config)
    tensors, stats = {}, {}
    for layer in frontend.observe_layers(windows, observers, config.batch_size):
        site = sites[layer]
        done = {name: observers.pop(name) for name in (getattr(site, kind) for kind in config.observed_kinds)}
        site_tensors, site_stats = attention_qparams([site], done, config)
        tensors.update(site_tensors)
        for key, table in site_stats.items():
            stats.setdefault(key, {}).update(table)
        del done  # before the next layer runs
    return Recipe(config, geometry(sites.values()), tensors, stats)


def attention_observers(sites: list[AttentionSite], config: QuantConfig, tokens: int) -> dict[str, Observer]:
    """One observer per site value that ``config`` quantizes, keyed by the value's name in the IR."""
    stride = max(1, tokens // SAMPLE_TOKENS)
    return {getattr(s, kind): Observer(stride, SAMPLE_TOKENS, config.window) for s in sites for kind in config.observed_kinds}


def attention_qparams(sites: list[AttentionSite], observers: dict[str, Observer], config: QuantConfig) -> tuple[dict, dict]:
    """The recipe tensors of FAQuant (``[heads, head_dim]``) and C8 (``[kv_heads * head_dim]``), and per-site SQNR
    and saturation (the fraction of the kept sample at the int8 limits, :mod:`qpass.core.saturation`)."""
    tensors, sqnr, zero, sat = {}, {}, {}, {}
    for site in sites:
        per_site, per_site_sat = {}, {}
        for kind in config.observed_kinds:
            obs = observers[getattr(site, kind)]
            zero_channels = int(((obs.min == 0) & (obs.max == 0)).sum())
            if zero_channels == obs.channels:
                raise QpassError(f"calibration: {kind} of attention layer {site.layer} ({site.prefix or site.attention}) was 0 "
                                 "in every channel over the whole calibration text, so it has no range to quantize; "
                                 "check the model and the calibration text")
            if zero_channels:  # they get scale 1 (any scale round-trips 0): flagged in the report
                zero.setdefault(str(site.layer), {})[kind] = zero_channels
            heads = site.num_heads if kind == "q" else site.num_kv_heads
            scale, offset = channel_qparams(obs, config.observer, config.symmetric, config.percentile)  # [C]
            if config.fa_quant:
                tensors[site_key(site.layer, f"fa_{kind}", "scale")] = scale.reshape(heads, site.head_dim)
                tensors[site_key(site.layer, f"fa_{kind}", "offset")] = offset.reshape(heads, site.head_dim)
            if config.kv_cache == "int8" and kind in ("k", "v"):
                tensors[site_key(site.layer, f"kv_{kind}", "scale")] = scale.clone()
                tensors[site_key(site.layer, f"kv_{kind}", "offset")] = offset.clone()
            per_site[kind] = round(sqnr_db(obs.sample(), scale, offset), 3)
            per_site_sat[kind] = float(saturated(obs.sample(), scale, offset, config.symmetric).float().mean())
        sqnr[str(site.layer)], sat[str(site.layer)] = per_site, per_site_sat
    return tensors, {"sqnr_db": sqnr, "saturation": sat, **({"zero_range_channels": zero} if zero else {})}


def _calibrate_w8a8(frontend: Frontend, sites: list[AttentionSite], windows: torch.Tensor, config: QuantConfig) -> Recipe:
    linears = frontend.linear_sites()
    if not linears:
        raise QpassError("--w8a8: found no Linear with a parameter weight outside the LM head; this model has nothing W8A8 can quantize")
    calib, held = split_held_out(windows, config)
    stride = max(1, calib.numel() // LINEAR_SAMPLE_TOKENS)
    doc = {"act_method": config.act_method, "anti_method": config.anti_method, "alpha": config.alpha,
           "disable_level": config.disable_level, "smooth": [], "float_linears": {}}
    tensors, w8a8_stats = {}, {}
    state, smoothed = frontend.state_dict(), None
    if config.anti_method is not None:
        groups = frontend.smoothing_groups(linears)
        if not groups:
            raise QpassError(f"--anti-method {config.anti_method}: found no norm or Linear whose output feeds only Linears; "
                             "this model has nothing to smooth (drop --anti-method)")
        group_obs = {name: Observer(stride, LINEAR_SAMPLE_TOKENS) for name in sorted({g.input for g in groups})}
        frontend.observe(calib, group_obs, config.batch_size, desc="calibrate (smoothing)")
        scales, chosen = smoothing_scales(config.anti_method, groups, group_obs, state, config.act_method, config.alpha)
        for i, (g, s) in enumerate(zip(groups, scales)):
            tensors[smooth_key(i)] = s.contiguous()
            doc["smooth"].append(g.to_recipe(smooth_key(i)))
        w8a8_stats["smooth"] = {"groups": len(groups), **_chosen(chosen)}
        state = smoothed = apply_smoothing(state, doc["smooth"], tensors)
    linear_obs = {name: Observer(stride, LINEAR_SAMPLE_TOKENS) for name in sorted({s.input for s in linears})}
    attention_obs = attention_observers(sites, config, calib.numel())
    frontend.observe(calib, {**linear_obs, **attention_obs}, config.batch_size, state_dict=smoothed)
    attn_tensors, stats = attention_qparams(sites, attention_obs, config)
    per_linear = {"range_ratio": {}, "act_method_used": {}, "output_sqnr_db": {}}
    for site in linears:
        obs = linear_obs[site.input]
        if float(obs.min.min()) == 0.0 == float(obs.max.max()):
            raise QpassError(f"calibration: the input of Linear {site.module} was 0 over the whole calibration text, so it "
                             "has no range to quantize; check the model and the calibration text")
        scale, offset, used = linear_input_qparams(obs, config.act_method)
        tensors[linear_key(site.module, "scale")], tensors[linear_key(site.module, "offset")] = scale, offset
        weight = state[f"{site.module}.weight"].detach()
        per_linear["range_ratio"][site.module] = round(obs.range_ratio(), 3)
        per_linear["act_method_used"][site.module] = used
        per_linear["output_sqnr_db"][site.module] = round(output_sqnr_db(obs.sample(), weight, scale, offset), 3)
    w8a8_stats.update(per_linear)
    base = Recipe(config, geometry(sites), {**attn_tensors, **tensors}, {**stats, "w8a8": w8a8_stats}, doc)
    if config.disable_level == "auto":
        sensitivity = frontend.loss_sensitivity(base, linears, calib[: config.batch_size])
        if sensitivity is not None:
            w8a8_stats = {**w8a8_stats, "loss_sensitivity": sensitivity}
            base = base.replace(stats={**stats, "w8a8": w8a8_stats})
    floats, search = choose_float_linears(base, linears, held, frontend.logits)
    if search:
        w8a8_stats = {**w8a8_stats, "search": search}
    drop = {linear_key(name, part) for name in floats for part in ("scale", "offset")}  # float Linears have no qparams
    return Recipe(config, base.sites, {k: v for k, v in base.tensors.items() if k not in drop},
                  {**stats, "w8a8": w8a8_stats}, {**doc, "float_linears": floats})


def _chosen(chosen: list[dict]) -> dict:
    """What the smoothing method chose per group, as lists (``statistics``/``exponents`` for m3, ``steps`` for m4)."""
    names = {"statistic": "statistics", "exponent": "exponents", "step": "steps"}
    return {names[k]: [c[k] for c in chosen] for k in (chosen[0] if chosen else {})}
