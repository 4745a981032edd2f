"""W8A8 calibration: smoothing, activation observers on every Linear input, and the float fallback.

The order matters and is fixed here:

1. float run with :class:`LinearObserver` on the smoothing groups' inputs (only with an anti-method);
2. the anti-method's pass folds its scales into the calibration module's parameters (a copy: the
   input model is never written);
3. one run of the *smoothed* module observes every Linear input (W8A8 activation qparams) and q/k/v
   (FAQuant / C8; v_proj -> o_proj smoothing changes V, so V is observed after it);
4. fallback: ``Ln`` keeps the n Linears with the widest range float; ``auto`` ranks Linears twice
   (by loss sensitivity, the first-order loss change of each Linear's W8A8 error from one backward
   pass, and by the output SQNR of their W8A8 form on the sample), keeps the ranking that does better
   with 10% of the Linears float, and binary-searches the fewest float Linears that keep the
   perplexity increase on held-out calibration windows within ``max_ppl_increase``. The increase is
   measured on a sample of windows, so the search holds its one-sided 95% upper bound (over the
   per-window NLL differences) to the limit, not the point estimate: text the calibration never saw
   lands within the limit too (SmolLM2: held-out +1.89% gave +2.11% on prose and +2.6% on code).
"""

import copy
import math

import torch
from tqdm.auto import tqdm

from qpass.calibrate import attach_observers, geometry, make_recipe, observed_kinds, SAMPLE_TOKENS
from qpass.config import QuantConfig
from qpass.errors import QpassError
from qpass.evaluate import window_nll
from qpass.linear_observer import LinearObserver, act_qparams, fake_quant_weight, output_sqnr_db
from qpass.observers import fake_quant
from qpass.passes.awq_scale import AWQScalePass
from qpass.passes.find_attention_sites import AttentionSite
from qpass.passes.find_linear_sites import LinearSite, find_linear_sites, find_smoothing_groups
from qpass.passes.iterative_smooth import IterativeSmoothPass
from qpass.passes.smooth_quant import SmoothQuantPass, module_param
from qpass.passes.smooth_quant_shift import SmoothQuantShiftPass
from qpass.capture import param_names
from qpass.pipeline import quantize_program
from qpass.recipe import Recipe

LINEAR_SAMPLE_TOKENS = 512   # tokens kept per Linear input for smoothing searches, histograms and SQNR
MAX_HELD_OUT = 16            # calibration windows held out for the `auto` perplexity search, at most
UPPER_Z = 1.645              # `auto`: one-sided 95% normal quantile for the bound on the perplexity increase
FALLBACK_SHARE = 0.10        # `auto` first tries this share of the Linears in float, then searches below or above


def smoothing_pass(config: QuantConfig, groups, stats):
    """The pass of ``config.anti_method`` (m1 .. m4)."""
    if config.anti_method == "m1":
        return SmoothQuantPass(groups, stats, config.act_method, config.alpha)
    if config.anti_method == "m2":
        return SmoothQuantShiftPass(groups, stats, config.act_method, config.alpha)
    if config.anti_method == "m3":
        return AWQScalePass(groups, stats, config.act_method)
    if config.anti_method == "m4":
        return IterativeSmoothPass(groups, stats, config.act_method)
    raise ValueError(f"anti_method={config.anti_method!r} has no pass")


def calibrate_w8a8(program: torch.export.ExportedProgram, sites: list[AttentionSite], windows: torch.Tensor,
                   config: QuantConfig) -> Recipe:
    """Smooth, observe and choose the float Linears over ``windows [N, W]``; the recipe of ``config``."""
    names = param_names(program)
    linears = find_linear_sites(program.graph, names)
    if not linears:
        raise QpassError("--w8a8: found no Linear with a parameter weight outside the LM head; this model has nothing W8A8 can quantize")
    calib, held = split_held_out(windows, config)
    stride = max(1, calib.numel() // LINEAR_SAMPLE_TOKENS)
    gm = program.module()  # its parameters are replaced (not written) by smoothing
    doc = {"act_method": config.act_method, "anti_method": config.anti_method, "alpha": config.alpha,
           "disable_level": config.disable_level, "smooth": [], "float_linears": {}}
    tensors, stats = {}, {}
    if config.anti_method is not None:
        groups = find_smoothing_groups(program.graph, linears, names)
        if not groups:
            raise QpassError(f"--anti-method {config.anti_method}: found no norm or Linear whose output feeds only Linears; "
                             "this model has nothing to smooth (drop --anti-method)")
        observers = attach_linear_observers(gm, sorted({g.input for g in groups}), stride)
        run(gm, calib, config.batch_size, "calibrate (smoothing)")
        detach(gm, observers)
        smoother = smoothing_pass(config, groups, observers)
        smoother(gm)
        for i, (g, s) in enumerate(zip(groups, smoother.scales)):
            tensors[f"smooth.{i}.scale"] = s.contiguous()
            doc["smooth"].append(g.to_recipe(f"smooth.{i}.scale"))
        stats["smooth"] = {"groups": len(groups),
                           **({"statistics": smoother.statistics} if hasattr(smoother, "statistics") else {}),
                           **({"exponents": smoother.exponents} if hasattr(smoother, "exponents") else {}),
                           **({"steps": smoother.steps} if hasattr(smoother, "steps") else {})}
    linear_obs = attach_linear_observers(gm, sorted({s.input for s in linears}), stride)
    qkv_obs = attach_observers(gm, sites, observed_kinds(config), max(1, calib.numel() // SAMPLE_TOKENS))
    run(gm, calib, config.batch_size, "calibrate")
    recipe = make_recipe(sites, qkv_obs, config)
    per_linear = {"range_ratio": {}, "act_method_used": {}, "output_sqnr_db": {}}
    for site in linears:
        obs = linear_obs[site.input]
        ratio = obs.range_ratio()
        scale, offset, used = act_qparams(float(obs.min.min()), float(obs.max.max()), obs.sample(), ratio, config.act_method)
        tensors[f"w8a8.{site.module}.input_scale"] = scale
        tensors[f"w8a8.{site.module}.input_offset"] = offset
        weight = module_param(gm, f"{site.module}.weight").detach()
        per_linear["range_ratio"][site.module] = round(ratio, 3)
        per_linear["act_method_used"][site.module] = used
        per_linear["output_sqnr_db"][site.module] = round(output_sqnr_db(obs.sample(), weight, scale, offset), 3)
    recipe.tensors.update(tensors)
    recipe.w8a8 = doc
    recipe.stats["w8a8"] = {**stats, **per_linear}
    if config.disable_level == "auto":
        detach(gm, {**linear_obs, **{str(k): v for k, v in qkv_obs.items()}})
        recipe.stats["w8a8"]["loss_sensitivity"] = loss_sensitivity(gm, linears, recipe, calib[: config.batch_size])
    floats, search = choose_float_linears(program, sites, recipe, linears, held)
    doc["float_linears"] = floats
    if search:
        recipe.stats["w8a8"]["search"] = search
    for name in floats:  # a float Linear has no activation qparams in the recipe
        del recipe.tensors[f"w8a8.{name}.input_scale"], recipe.tensors[f"w8a8.{name}.input_offset"]
    return recipe


def split_held_out(windows: torch.Tensor, config: QuantConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(calibration windows, held-out windows)``; only ``auto`` holds windows out: the last quarter, at
    most ``MAX_HELD_OUT``. The windows run in text order, so the held-out ones come from the last
    modules of the calibration text, which calibration never sees: an estimate for unseen text.
    (Windows spread evenly instead sit beside calibration windows of the same modules; on SmolLM2 that
    estimated +1.35% for a choice that gave +2.18% on prose and +2.71% on code.)"""
    if config.disable_level != "auto":
        return windows, None
    if windows.shape[0] < 2:
        raise QpassError(f"--disable-level auto: needs at least 2 calibration windows (one is held out), got {windows.shape[0]}; "
                         "give more calibration text or raise --calib-samples")
    held = max(1, min(MAX_HELD_OUT, windows.shape[0] // 4))
    return windows[:-held], windows[-held:]


def attach_linear_observers(gm: torch.fx.GraphModule, inputs: list[str], stride: int) -> dict[str, LinearObserver]:
    """A :class:`LinearObserver` after each of the ``inputs`` nodes of ``gm`` (in place); returns them by node name."""
    nodes = {n.name: n for n in gm.graph.nodes}
    observers = {}
    for i, name in enumerate(inputs):
        observers[name] = LinearObserver(stride=stride, max_tokens=LINEAR_SAMPLE_TOKENS)
        gm.add_submodule(f"qpass_linear_observer_{i}", observers[name])
        with gm.graph.inserting_after(nodes[name]):
            gm.graph.call_module(f"qpass_linear_observer_{i}", (nodes[name],))
    gm.recompile()
    return observers


def detach(gm: torch.fx.GraphModule, observers: dict[str, LinearObserver]) -> None:
    """Remove the observer calls and submodules :func:`attach_linear_observers` added."""
    mine = {id(o) for o in observers.values()}
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and id(gm.get_submodule(node.target)) in mine:
            target = node.target
            gm.graph.erase_node(node)
            gm.delete_submodule(target)
    gm.recompile()


def run(gm: torch.fx.GraphModule, windows: torch.Tensor, batch_size: int, desc: str) -> None:
    with torch.no_grad():
        for batch in tqdm(windows.split(batch_size), desc=desc, unit="batch", leave=False, disable=None):
            gm(batch)


class _ErrorTap(torch.nn.Module):
    """Identity on a Linear's output ``y``; keeps ``dy`` (its W8A8 output minus ``y``) and a zero leaf whose
    gradient is ``dL/dy``, for :func:`loss_sensitivity`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, offset: torch.Tensor):
        super().__init__()
        self.weight_fq, self.bias = fake_quant_weight(weight.detach().float()), bias
        self.scale, self.offset = scale, offset
        self.dy = self.leaf = None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.dy = torch.nn.functional.linear(fake_quant(x, self.scale, self.offset), self.weight_fq, self.bias) - y
        self.leaf = torch.zeros_like(y, requires_grad=True)
        return y + self.leaf


def loss_sensitivity(gm: torch.fx.GraphModule, linears: list[LinearSite], recipe: Recipe, windows: torch.Tensor) -> dict[str, float]:
    """Per Linear, ``sum over tokens (dL/dy . dy)^2``: the squared first-order change of each token's loss
    when that Linear alone runs W8A8 (``dy``), from one forward and one backward over ``windows``."""
    graph = copy.deepcopy(gm.graph)
    probe = torch.fx.GraphModule(gm, graph)  # shares gm's (smoothed) parameters
    nodes = {n.name: n for n in graph.nodes}
    taps = {}
    for i, site in enumerate(linears):
        bias = module_param(gm, f"{site.module}.bias").detach() if site.bias is not None else None
        taps[site.module] = _ErrorTap(module_param(gm, f"{site.module}.weight"), bias,
                                      recipe.tensors[f"w8a8.{site.module}.input_scale"],
                                      recipe.tensors[f"w8a8.{site.module}.input_offset"])
        probe.add_submodule(f"qpass_error_tap_{i}", taps[site.module])
        linear = nodes[site.node]
        with graph.inserting_after(linear):
            tap = graph.call_module(f"qpass_error_tap_{i}", (nodes[site.input], linear))
        linear.replace_all_uses_with(tap, delete_user_cb=lambda user, tap=tap: user is not tap)
    probe.recompile()
    with torch.enable_grad():
        logits = probe(windows)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), windows[:, 1:].flatten(), reduction="sum")
        grads = torch.autograd.grad(nll, [t.leaf for t in taps.values()])
    return {name: round(float(((g * t.dy).sum(-1)).pow(2).sum()), 6) for (name, t), g in zip(taps.items(), grads)}


def increase_bound(diff: torch.Tensor) -> tuple[float, float]:
    """``(perplexity increase %, its one-sided 95% upper bound %)`` from per-window NLL differences
    ``diff [N]`` (quantized minus float, equal-length windows); the bound is the estimate when N < 2."""
    mean = float(diff.mean())
    se = float(diff.std()) / math.sqrt(diff.numel()) if diff.numel() > 1 else 0.0
    return (math.exp(mean) - 1.0) * 100.0, (math.exp(mean + UPPER_Z * se) - 1.0) * 100.0


def choose_float_linears(program, sites, recipe: Recipe, linears: list[LinearSite],
                         held: torch.Tensor | None) -> tuple[dict[str, str], list[dict]]:
    """``({module: why it stays float}, search log)`` for ``recipe.config.disable_level``."""
    config = recipe.config
    level = config.disable_level
    n_all = len(linears)
    if level == "L0":
        return {}, []
    stats = recipe.stats["w8a8"]
    if level != "auto":
        n = int(level[1:])
        if n > n_all:
            raise QpassError(f"--disable-level {level}: the model has only {n_all} quantizable Linears; use at most L{n_all}")
        ranked = sorted(linears, key=lambda s: -stats["range_ratio"][s.module])[:n]
        return {s.module: f"{level}: activation range max|x|/std = {stats['range_ratio'][s.module]:.1f}, "
                          f"rank {i + 1} of {n_all}" for i, s in enumerate(ranked)}, []
    target = config.max_ppl_increase
    nll_float = window_nll(program.module(), held, config.batch_size, "fallback float")
    ppl_float = math.exp(float(nll_float.mean()))
    log, estimates = [], {}

    def measure(names: list[str], label: str) -> float:
        trial = Recipe(config, geometry(sites), recipe.tensors, recipe.stats,
                       {**recipe.w8a8, "float_linears": {n: "trial" for n in names}})
        quantized, _ = quantize_program(program, sites, trial, verify=False)
        diff = window_nll(quantized.module(), held, config.batch_size, f"fallback {label}") - nll_float
        inc, upper = increase_bound(diff)
        log.append({"ranking": label.split(" ")[0], "float_linears": len(names), "ppl_increase_pct": round(inc, 4),
                    "upper_95_pct": round(upper, 4)})
        estimates[label] = inc
        return upper

    # Two cheap sensitivity rankings, most sensitive first; the one that does better with the first
    # FALLBACK_SHARE of the Linears float is searched.
    rankings = {"loss": sorted(linears, key=lambda s: -stats["loss_sensitivity"][s.module]),
                "sqnr": sorted(linears, key=lambda s: stats["output_sqnr_db"][s.module])}
    cap = max(1, math.ceil(FALLBACK_SHARE * n_all))
    tried: dict[int, float] = {0: measure([], "none 0")}
    if tried[0] > target:
        at_cap = {name: measure([s.module for s in r[:cap]], f"{name} {cap}") for name, r in rankings.items()}
        best = min(at_cap, key=at_cap.get)
        tried[cap] = at_cap[best]
    else:
        best = "loss"
    ranked = rankings[best]

    def increase(k: int) -> float:
        if k not in tried:
            tried[k] = measure([s.module for s in ranked[:k]], f"{best} {k}")
        return tried[k]

    if increase(0) <= target:
        k = 0
    else:
        lo, hi = 0, cap  # invariant: increase(lo) > target, increase(hi) <= target
        if increase(cap) > target:
            lo, hi = cap, n_all
            if increase(n_all) > target:  # not reachable by keeping Linears float: take the best tried
                hi = min(tried, key=lambda j: (tried[j], j))
                lo = hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if increase(mid) <= target:
                hi = mid
            else:
                lo = mid
        k = hi
    reached = "within" if tried[k] <= target else "NOT within"
    floats = {s.module: f"auto: {best} sensitivity rank {i + 1} of {n_all} (loss sensitivity "
                        f"{stats['loss_sensitivity'][s.module]:.3g}, output SQNR {stats['output_sqnr_db'][s.module]:.1f} dB); "
                        f"{k} float Linears keep held-out perplexity at {estimates[f'{best} {k}' if k else 'none 0']:+.2f}%, 95% upper bound "
                        f"{tried[k]:+.2f}% ({reached} {target}%)"
              for i, s in enumerate(ranked[:k])}
    return floats, [{"held_out_windows": int(held.shape[0]), "ppl_float": ppl_float}, *log]
