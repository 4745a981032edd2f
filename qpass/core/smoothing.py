"""Anti-outlier smoothing as data: the scales of each method, and how they fold into float weights.

A smoothing group divides the activations feeding some Linears by a per-channel ``scale`` and
multiplies those Linears' weight columns by it, so the float function is unchanged while the
activations lose their outlier channels. The division is folded into what produces the
activations: a norm's weight (``prev_kind = "norm"``) or the output rows of the preceding Linear
(``prev_kind = "linear"``, e.g. v_proj -> o_proj, up_proj -> down_proj).

The methods (``--anti-method``), each a function of the group's input statistics (an
:class:`~qpass.core.observers.Observer`) and its consumers' stacked weights ``[n, C]``:

- m1 SmoothQuant: ``s = max|X|^a / max|W|^(1-a)`` (``alpha``, 0.5 by default);
- m2 SmoothQuant on the shifted range ``max|X - z|``, ``z = (max + min) / 2``. Folding the shift
  itself needs a bias on what produces ``X``; an RMSNorm has none and the formats carry no shift
  tensor, so only the scale computed from the shifted range is folded (the asymmetric activation
  offset absorbs the rest);
- m3 activation-aware scaling: ``s = stat^r`` for ``stat`` in ``mean|X|`` (msModelSlim's m3) and
  ``max|X|``, ``r`` on a grid, normalised so ``max(s) min(s) = 1``; the pair with the least W8A8
  output error on the sample wins (:func:`qpass.core.w8a8.quantized_output_error`). ``max|X|`` is
  searched too because a per-tensor int8 step is set by the largest value: SmolLM2's down_proj
  inputs carry single channels thousands of times their bulk, which ``mean|X|^r`` cannot bring down
  (all-int8 +11.7% with ``mean`` alone, +4.6% with both; docs/benchmarks.md). ``r = 0`` is on the
  grid, so the search never does worse than no smoothing on the sample;
- m4 iterative SmoothQuant: ``STEPS`` steps with ``a = 0.9`` on the already-smoothed statistics,
  accumulating ``s``; the step (or none) with the least output error is kept.

Recipe JSON, ``w8a8.smooth``: a list of groups

    {"scale": "smooth.<i>.scale",          # tensor name in the recipe, float32 [prev channels]
     "prev": "model.layers.0.input_layernorm",   # module path
     "prev_kind": "norm" | "linear",
     "consumers": ["model.layers.0.self_attn.q_proj", ...],
     "group": 1}                            # GQA: each of prev's head blocks feeds `group` consumer head blocks
                                            # (v_proj -> o_proj); "head_dim" then gives the block size

Key smoothing (``prev_kind = "key"``, the dynamic int8 KV cache only): K's channels are divided by a
per-channel ``scale`` and Q's multiplied by it, so every score ``q . k`` is unchanged.
``prev`` is the k projection (its output rows and bias divided), the one consumer the q projection (its
output rows and bias multiplied, each kv head's block repeated over the q heads that share it). The
dynamic cache quantizes each token's K with one range over head_dim, which K's few large channels set;
dividing each channel by a power of its calibrated reach (:func:`key_smoothing_scale`, the power searched per
site) brings the others' steps down. A RoPE pair gets one scale, which rotation keeps.
These groups are not stored in the recipe's JSON: each comes from its site's ``layers.<i>.key_smooth.scale``
tensor and the site's projections (:attr:`qpass.core.recipe.Recipe.smoothing`).
"""

import torch

from qpass.core.int8 import fake_quant_dynamic
from qpass.core.observers import Observer
from qpass.core.sites import SmoothGroup
from qpass.core.w8a8 import quantized_output_error

MIN_SCALE = 1e-5
KEY_SCALE_LIMIT = 1e3  # key smoothing: each channel's reach ratio within [1/limit, limit] of its head's mean
KEY_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # key smoothing: the exponents searched (0: none)
KEY_MIN_GAIN = 0.98  # key smoothing: an exponent is taken only where it errs at most this fraction of none's error
AWQ_GRID = tuple(round(0.05 * i, 2) for i in range(21))  # m3 exponents: 0, 0.05, ..., 1
AWQ_STATISTICS = ("mean", "max")
ITERATIVE_ALPHA, ITERATIVE_STEPS = 0.9, 4  # m4


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


def consumer_scale(scale: torch.Tensor, group: int, head_dim: int | None) -> torch.Tensor:
    """``scale [prev channels]`` expanded to the consumers' input channels (repeat each head block ``group`` times)."""
    if group == 1:
        return scale
    blocks = scale.view(-1, 1, head_dim)
    return blocks.expand(blocks.shape[0], group, head_dim).reshape(-1)


def _to_consumer(s: torch.Tensor, group: SmoothGroup) -> torch.Tensor:
    return consumer_scale(s, group.group, group.head_dim)


def m1_scale(group, x: Observer, weight, act_method, alpha):
    return smoothquant_scale(to_prev(x.absmax, group, "max"), to_prev(weight.abs().amax(0), group, "max"), alpha), {}


def m2_scale(group, x: Observer, weight, act_method, alpha):
    spread = (x.max - x.min) / 2.0  # max |X - z| per channel
    return smoothquant_scale(to_prev(spread, group, "max"), to_prev(weight.abs().amax(0), group, "max"), alpha), {}


def m3_scale(group, x: Observer, weight, act_method, alpha):
    sample = x.sample()
    reference = sample @ weight.t()

    def error(s):
        return quantized_output_error(sample, weight, _to_consumer(s, group), act_method, reference, x.min, x.max)

    candidates = {"mean": to_prev(x.mean_abs, group, "mean"), "max": to_prev(x.absmax, group, "max")}
    none = torch.ones_like(candidates["mean"])
    best = (error(none), AWQ_STATISTICS[0], 0.0, none)
    for name in AWQ_STATISTICS:
        stat = candidates[name].clamp(min=1e-8)
        for r in AWQ_GRID[1:]:  # r = 0 (no smoothing) is measured above
            s = stat.pow(r)
            s = s / (s.max() * s.min()).sqrt()
            err = error(s)
            if err < best[0]:
                best = (err, name, r, s)
    return best[3], {"statistic": best[1], "exponent": best[2]}


def m4_scale(group, x: Observer, weight, act_method, alpha):
    sample = x.sample()
    reference = sample @ weight.t()

    def error(s):
        return quantized_output_error(sample, weight, _to_consumer(s, group), act_method, reference, x.min, x.max)

    x_absmax, w_absmax = to_prev(x.absmax, group, "max"), to_prev(weight.abs().amax(0), group, "max")
    total = torch.ones_like(x_absmax)
    best = (error(total), 0, total)
    for step in range(1, ITERATIVE_STEPS + 1):
        total = total * smoothquant_scale(x_absmax / total, w_absmax * total, ITERATIVE_ALPHA)
        err = error(total)
        if err < best[0]:
            best = (err, step, total.clone())
    return best[2], {"step": best[1]}


METHODS = {"m1": m1_scale, "m2": m2_scale, "m3": m3_scale, "m4": m4_scale}


def smoothing_scales(
    method: str,
    groups: list[SmoothGroup],
    observers: dict[str, Observer],
    state_dict: dict[str, torch.Tensor],
    act_method: int | None,
    alpha: float,
) -> tuple[list[torch.Tensor], list[dict]]:
    """Per group, the scale ``[group.channels]`` float32 of ``method`` (m1 .. m4) and what the method chose.

    ``observers``: the float run's statistics by group input; ``state_dict``: the float weights (module
    paths + ``.weight``). A scale that is not a positive finite number becomes 1 (no smoothing there).
    ``act_method``: how the searches (m3, m4) quantize activations, per tensor; None for per token (dynamic W8A8).
    """
    scale_fn = METHODS[method]
    scales, chosen = [], []
    for g in groups:
        weight = torch.cat([state_dict[f"{c}.weight"].detach().float() for c in g.consumers])
        s, info = scale_fn(g, observers[g.input], weight, act_method, alpha)
        s = s.float()
        scales.append(torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s)).clamp(min=MIN_SCALE))
        chosen.append(info)
    return scales, chosen


def apply_smoothing(state_dict: dict[str, torch.Tensor], groups: list[dict], tensors) -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` (module paths, float) with every smoothing group folded in.

    ``groups`` is the recipe's ``w8a8.smooth`` list and ``tensors`` the recipe's tensors. Parameters
    not touched by a group are shared with ``state_dict``, not copied.
    """
    out = dict(state_dict)
    for g in groups:
        s = tensors[g["scale"]].double()
        prev = g["prev"]
        if g["prev_kind"] == "norm":
            out[f"{prev}.weight"] = (out[f"{prev}.weight"].double() / s).to(state_dict[f"{prev}.weight"].dtype)
        elif g["prev_kind"] in ("linear", "key"):
            _scale_rows(out, prev, 1.0 / s)
        else:
            raise ValueError(
                f"smoothing group for {prev}: prev_kind {g['prev_kind']!r} is not 'norm', 'linear' or 'key'"
            )
        s_cons = consumer_scale(s, g.get("group", 1), g.get("head_dim"))
        for name in g["consumers"]:
            if g["prev_kind"] == "key":  # the q projection's output rows: q . k unchanged
                _scale_rows(out, name, s_cons)
            else:
                w = out[f"{name}.weight"]
                out[f"{name}.weight"] = (w.double() * s_cons[None, :]).to(w.dtype)
    return out


def _scale_rows(state: dict[str, torch.Tensor], module: str, factor: torch.Tensor) -> None:
    """Multiply Linear ``module``'s output rows (weight ``[out, in]`` and bias) by ``factor [out]``, in ``state``."""
    w = state[f"{module}.weight"]
    state[f"{module}.weight"] = (w.double() * factor[:, None]).to(w.dtype)
    if f"{module}.bias" in state:
        state[f"{module}.bias"] = (state[f"{module}.bias"].double() * factor).to(state[f"{module}.bias"].dtype)


def key_smoothing_scale(k: Observer, q: Observer, head_dim: int, group: int) -> tuple[torch.Tensor, float]:
    """Key smoothing's scale ``[kv_heads * head_dim]`` and its exponent, from the observers of K and Q after RoPE
    (their kept samples: the same tokens). Each channel's reach over its head's geometric mean of reaches, raised to
    the exponent in ``KEY_ALPHAS`` whose smoothed K, quantized per token as the dynamic cache does, changes the kept
    sample's scores ``q . k`` least (``group``: q heads per kv head). Exponent 1 gives every channel of K the same
    reach, but moves the error onto the channels whose Q it enlarges; 0 (scale 1) is on the grid and is kept unless an
    exponent errs at least 2% less (``KEY_MIN_GAIN``), so the choice never errs more than no smoothing on the sample.

    A channel's reach is its largest magnitude; a RoPE pair's (``k.pairs``, channels ``d`` and ``d + turned``) is the
    largest norm of the pair, the magnitude either channel reaches once rotation turns it, and both channels get it (a
    pair must have one scale, or RoPE would no longer commute with it). Scales stay within ``KEY_SCALE_LIMIT`` of the
    mean; a channel that was 0 throughout gets the mean."""
    reach = k.absmax.double().reshape(-1, head_dim).clone()
    if k.pairs is not None:
        turned = k.pairs[1]
        pair = k.pair_reach.double().amax(1).reshape(-1, turned)
        reach[:, :turned], reach[:, turned : 2 * turned] = pair, pair
    seen = reach > 0
    logs = torch.where(seen, reach.clamp(min=torch.finfo(torch.float64).tiny).log(), torch.zeros_like(reach))
    mean = logs.sum(1, keepdim=True) / seen.sum(1, keepdim=True).clamp(min=1)
    ratio = torch.where(seen, (logs - mean).exp(), torch.ones_like(reach)).clamp(1.0 / KEY_SCALE_LIMIT, KEY_SCALE_LIMIT)
    keys = k.sample().float().reshape(-1, ratio.shape[0], head_dim)  # [tokens, kv_heads, head_dim]
    queries = q.sample().float().reshape(keys.shape[0], ratio.shape[0], group, head_dim)
    errors = []
    for alpha in KEY_ALPHAS:
        scale = ratio.pow(alpha).float()
        error = fake_quant_dynamic(keys / scale) * scale - keys
        errors.append(float(torch.einsum("thgd,shd->hgts", queries, error).pow(2).mean()))
    best = min(range(len(KEY_ALPHAS)), key=errors.__getitem__)
    alpha = KEY_ALPHAS[best] if errors[best] < KEY_MIN_GAIN * errors[0] else 0.0  # a tie keeps the weights
    return ratio.pow(alpha).reshape(-1).float(), alpha
