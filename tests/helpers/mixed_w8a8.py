"""Static W8A8 recipes with some Linears quantized per token (``w8a8.dynamic_linears``, :meth:`Recipe.activations`),
made by hand from a static calibration: what the exporters' and vLLM's tests of the per-Linear mix start from."""

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from qpass.cli import main
from qpass.core.recipe import Recipe, linear_key
from qpass.exporters.mindie_format import DESCRIPTION_FILE, WEIGHTS_FILE

# whole fused groups (q/k/v of layer 0, gate/up of layer 1) and single Linears, of a 2-layer Llama
DYNAMIC = (
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.1.self_attn.o_proj",
    "model.layers.1.mlp.gate_proj",
    "model.layers.1.mlp.up_proj",
)


def with_dynamic_linears(recipe: Recipe, linears=DYNAMIC) -> Recipe:
    """Static W8A8 ``recipe`` with ``linears`` quantized per token: named in ``w8a8.dynamic_linears`` and without
    their input qparams, as a finished recipe has them."""
    drop = {linear_key(p, part) for p in linears for part in ("scale", "offset")}
    return recipe.replace(
        w8a8={**recipe.w8a8, "dynamic_linears": dict.fromkeys(linears, "test: per-token activations")},
        tensors={k: v for k, v in recipe.tensors.items() if k not in drop},
    )


def mixed_recipe_dir(model_dir: Path, text_files, out: Path, *flags: str, linears=DYNAMIC) -> Path:
    """``out/recipe``: ``model_dir`` calibrated with static W8A8 (and ``flags``) by ``qpass compile``, then
    :func:`with_dynamic_linears`; for ``qpass compile --recipe``."""
    argv = ["compile", str(model_dir), "--w8a8", *flags, "--calib", str(text_files["calib"]), "-o", str(out / "qp")]
    assert main([*argv, "--window", "128", "--calib-samples", "8", "--eval-windows", "2"]) == 0
    with_dynamic_linears(Recipe.load(out / "qp" / "recipe"), linears).save(out / "recipe")
    return out / "recipe"


def splice_static_linear(mixed: Path, static: Path, p: str) -> None:
    """MindIE directory ``mixed`` with Linear ``p``'s tensors and types replaced by those MindIE directory ``static``
    has for it (a directory qpass does not write: Linears of two types in one fused group)."""
    tensors, desc = load_file(str(mixed / WEIGHTS_FILE)), json.loads((mixed / DESCRIPTION_FILE).read_text())
    theirs, their_desc = load_file(str(static / WEIGHTS_FILE)), json.loads((static / DESCRIPTION_FILE).read_text())
    for name in [n for n in tensors if n.startswith(f"{p}.")]:
        del tensors[name], desc[name]
    for name in [n for n in theirs if n.startswith(f"{p}.")]:
        tensors[name], desc[name] = theirs[name], their_desc[name]
    save_file(tensors, str(mixed / WEIGHTS_FILE))
    (mixed / DESCRIPTION_FILE).write_text(json.dumps(desc))
