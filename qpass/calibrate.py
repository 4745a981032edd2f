"""Run the float program over calibration windows with observers on q, k and v, and make a recipe."""

import torch
from tqdm.auto import tqdm

from qpass.config import QuantConfig
from qpass.observers import Observer, sqnr_db
from qpass.passes.find_attention_sites import AttentionSite
from qpass.recipe import Recipe, SiteGeometry

KINDS = ("q", "k", "v")
SAMPLE_TOKENS = 2048  # tokens kept per observed value for the range search


def geometry(sites: list[AttentionSite]) -> list[SiteGeometry]:
    return [SiteGeometry(s.layer, s.num_heads, s.num_kv_heads, s.head_dim) for s in sites]


def observed_kinds(config: QuantConfig) -> tuple[str, ...]:
    if config.fa_quant:
        return KINDS
    return ("k", "v") if config.kv_cache == "int8" else ()


def attach_observers(gm: torch.fx.GraphModule, sites: list[AttentionSite], kinds, stride: int) -> dict:
    """Insert an :class:`Observer` after each site's q/k/v node of ``gm`` (in place); returns them by (layer, kind)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    observers = {}
    for site in sites:
        for kind in kinds:
            node = nodes[getattr(site, kind)]
            name = f"qpass_observer_{site.layer}_{kind}"
            observers[site.layer, kind] = Observer(stride=stride, max_tokens=SAMPLE_TOKENS)
            gm.add_submodule(name, observers[site.layer, kind])
            with gm.graph.inserting_after(node):
                gm.graph.call_module(name, (node,))
    gm.recompile()
    return observers


def calibrate(program: torch.export.ExportedProgram, sites: list[AttentionSite], windows: torch.Tensor,
              config: QuantConfig) -> Recipe:
    """Observe q/k/v over ``windows [N, W]`` and choose scales/offsets per ``config``.

    With ``config.w8a8`` the Linears are smoothed and observed too (:func:`qpass.w8a8_calibrate.calibrate_w8a8`).
    """
    if config.w8a8:
        from qpass.w8a8_calibrate import calibrate_w8a8  # it imports this module

        return calibrate_w8a8(program, sites, windows, config)
    kinds = observed_kinds(config)
    tokens = windows.numel()
    stride = max(1, tokens // SAMPLE_TOKENS)
    gm = program.module()
    observers = attach_observers(gm, sites, kinds, stride)
    with torch.no_grad():
        for batch in tqdm(windows.split(config.batch_size), desc="calibrate", unit="batch", leave=False, disable=None):
            gm(batch)
    return make_recipe(sites, observers, config)


def make_recipe(sites: list[AttentionSite], observers: dict, config: QuantConfig) -> Recipe:
    tensors, stats = {}, {"sqnr_db": {}}
    for site in sites:
        per_site = {}
        for kind in observed_kinds(config):
            obs = observers[site.layer, kind]
            scale, offset = obs.qparams(config.observer, config.symmetric, config.percentile)  # [H, D]
            if config.fa_quant:
                tensors[f"layers.{site.layer}.fa_{kind}.scale"] = scale
                tensors[f"layers.{site.layer}.fa_{kind}.offset"] = offset
            if config.kv_cache == "int8" and kind in ("k", "v"):
                tensors[f"layers.{site.layer}.kv_{kind}.scale"] = scale.flatten().clone()
                tensors[f"layers.{site.layer}.kv_{kind}.offset"] = offset.flatten().clone()
            per_site[kind] = round(sqnr_db(obs.sample(), scale.flatten(), offset.flatten()), 3)
        stats["sqnr_db"][str(site.layer)] = per_site
    return Recipe(config, geometry(sites), tensors, stats)
