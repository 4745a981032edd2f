"""Anti-outlier smoothing as data: what a recipe says, and how it is folded into float weights.

A smoothing group divides the activations feeding some Linears by a per-channel ``scale`` and
multiplies those Linears' weight columns by it, so the float function is unchanged while the
activations lose their outlier channels. The division is folded into what produces the
activations: a norm's weight (``prev_kind = "norm"``) or the output rows of the preceding Linear
(``prev_kind = "linear"``, e.g. v_proj -> o_proj, up_proj -> down_proj).

Recipe JSON, ``w8a8.smooth``: a list of groups

    {"scale": "smooth.<i>.scale",          # tensor name in the recipe, float32 [prev channels]
     "prev": "model.layers.0.input_layernorm",   # module path (HF names)
     "prev_kind": "norm" | "linear",
     "consumers": ["model.layers.0.self_attn.q_proj", ...],
     "group": 1}                            # GQA: each of prev's head blocks feeds `group` consumer head blocks
                                            # (v_proj -> o_proj); "head_dim" then gives the block size
"""

import torch


def consumer_scale(scale: torch.Tensor, group: int, head_dim: int | None) -> torch.Tensor:
    """``scale [prev channels]`` expanded to the consumers' input channels (repeat each head block ``group`` times)."""
    if group == 1:
        return scale
    blocks = scale.view(-1, 1, head_dim)
    return blocks.expand(blocks.shape[0], group, head_dim).reshape(-1)


def apply_smoothing(state_dict: dict[str, torch.Tensor], groups: list[dict], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` (HF parameter names, float) with every smoothing group folded in.

    ``groups`` is the recipe's ``w8a8.smooth`` list and ``tensors`` the recipe's tensors. Parameters
    not touched by a group are shared with ``state_dict``, not copied.
    """
    out = dict(state_dict)
    for g in groups:
        s = tensors[g["scale"]].double()
        prev = g["prev"]
        if g["prev_kind"] == "norm":
            out[f"{prev}.weight"] = (out[f"{prev}.weight"].double() / s).to(state_dict[f"{prev}.weight"].dtype)
        elif g["prev_kind"] == "linear":
            w = out[f"{prev}.weight"]
            out[f"{prev}.weight"] = (w.double() / s[:, None]).to(w.dtype)
            if f"{prev}.bias" in out:
                out[f"{prev}.bias"] = (out[f"{prev}.bias"].double() / s).to(w.dtype)
        else:
            raise ValueError(f"smoothing group for {prev}: prev_kind {g['prev_kind']!r} is not 'norm' or 'linear'")
        s_cons = consumer_scale(s, g.get("group", 1), g.get("head_dim"))
        for name in g["consumers"]:
            w = out[f"{name}.weight"]
            out[f"{name}.weight"] = (w.double() * s_cons[None, :]).to(w.dtype)
    return out
