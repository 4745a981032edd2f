"""Write the MindIE quantized weight directory (:mod:`qpass.exporters.mindie_format`) from a recipe, the
sites' module names and the float state dict, for one of two consumers (``target``):

- ``mindie``: as MindIE's documentation says: ``quantization_config`` in ``config.json``
  (``fa_quant_type`` / ``kv_quant_type``), C8 tensors typed ``W8A8``;
- ``vllm-ascend``: what vllm-ascend's loader accepts (checked against its source; FORMATS.md section 1):
  no ``quantization_config`` (when present, vLLM builds the quant config from it and never reads the
  description), ``lm_head.weight`` typed ``FLOAT`` even when tied, C8 tensors typed ``C8`` and symmetric
  (its decode dequantizes with the scale only), no FAQuant (registered there only as FAKQuant for MLA
  models, and never with C8).

For both: one quant type per fused layer (q/k/v -> qkv_proj, gate/up -> gate_up_proj), so a Linear kept float makes
its fused siblings float too (:func:`fused_floats`; ``report.json``'s ``export.float_for_fusion``). vllm-ascend and
MindIE-LLM's runtime both raise on a merged layer whose shards differ in type, FLOAT beside W8A8 included; ATB-Models'
older loader packs such a mix (``MIX_W8A8``) but loads an all-float group as well.

Dynamic W8A8 (``--w8a8 dynamic``) is written as msModelSlim's ``W8A8_DYNAMIC``, which both consumers read
(vllm-ascend's ``w8a8_dynamic`` method): ``"model_quant_type": "W8A8_DYNAMIC"``, and per quantized Linear ``<p>``
``weight`` int8 ``[n, k]``, ``weight_scale`` and ``weight_offset`` (0) ``[n, 1]`` in the model dtype, typed
``W8A8_DYNAMIC``; its float ``bias``, when it has one, stays ``FLOAT`` (added after the int32 product is scaled).
Each token's activation scale ``max|x| / 127`` is computed at run time (``npu_dynamic_quant``).

Static W8A8 with per-token Linears (the recipe's ``w8a8.dynamic_linears``, :meth:`Recipe.activations`) is written per
Linear: each dynamic one in the W8A8_DYNAMIC form above, each static one as W8A8, typed per tensor, with
``"model_quant_type": "W8A8"`` still (``W8A8_DYNAMIC`` only for ``--w8a8 dynamic``). Both consumers choose a Linear's
method by its weight's own type, and both refuse a fused layer whose shards differ in type; checked against their
source (docs/formats.md has the details):

- vllm-ascend (``vllm_ascend/quantization/modelslim_config.py``, ``AscendModelSlimConfig.get_quant_method`` ->
  ``create_scheme_for_layer`` -> ``get_linear_quant_type``): the scheme of each Linear is the registry's entry for
  ``description["<p>.weight"]`` (``W8A8`` -> ``AscendW8A8LinearMethod``, ``W8A8_DYNAMIC`` ->
  ``AscendW8A8DynamicLinearMethod``); ``model_quant_type`` is not read there. For a packed layer (qkv_proj,
  gate_up_proj) every shard's type must be the same, else a ValueError ("Not all shards of ... are quantized with
  same quant type").
- MindIE-LLM's runtime (``mindie_llm/runtime/layers/quantization/ms_model_slim/quantization_config.py``,
  ``QuantizationConfig.get_quant_method``): ``W8A8`` -> ``W8A8PerTensorLinearMethod``, ``W8A8_DYNAMIC`` ->
  ``W8A8PerTokenLinearMethod``, per weight; merged q/k/v and gate/up prefixes with more than one type raise a
  ValueError. (ATB-Models' older loader, ``atb_llm/utils/weights.py``, reads every quantized Linear's tensors by the
  model-level ``quantize`` instead, so a W8A8_DYNAMIC Linear in a W8A8 model does not load there; not run.)

A fused group (:func:`qpass.core.naming.fused_siblings`) whose Linears mix static and per-token activations is
therefore refused (:func:`check_fused_activations`), for both targets.
"""

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from qpass.core.errors import QpassError
from qpass.core.int8 import QMAX
from qpass.core.naming import LM_HEAD, fused_siblings, layer_of
from qpass.core.recipe import Recipe
from qpass.core.smoothing import apply_smoothing
from qpass.exporters.base import first_refusal
from qpass.exporters.mindie_format import (
    C8,
    C8_PROJECTIONS,
    CONFIG_FILE,
    DESCRIPTION_FILE,
    FA_KINDS,
    FAQUANT,
    FLOAT,
    W8A8,
    W8A8_DYNAMIC,
    WEIGHTS_FILE,
    WEIGHTS_INDEX,
    shard_name,
)
from qpass.runtime.w8a8 import w8a8_weights

MODEL_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
TARGETS = ("mindie", "vllm-ascend")


def refusal(config, options: dict, target: str = "mindie") -> str | None:
    """What ``target``'s loader cannot run under the policy ``config`` with ``options`` (``dtype``, the input's
    ``frontend``), in one line with the way out; None when it can."""
    dtype = options.get("dtype") or "float16"
    return first_refusal(
        (
            (
                f"--format {target}: the MindIE weight directory has the targets {', '.join(TARGETS)}",
                target not in TARGETS,
            ),
            (
                f"--format {target}: an ONNX input is written as ONNX (its weights stay in its graph); "
                "drop --format, or compile the PyTorch model for this format",
                options.get("frontend") == "onnx",
            ),
            (
                f"--dtype {dtype}: the MindIE format stores {' or '.join(MODEL_DTYPES)} models; choose one of those",
                dtype not in MODEL_DTYPES,
            ),
            (
                f"--format {target} with --kv-int8 dynamic: the MindIE weight format holds only a static int8 "
                "KV cache (C8, per-channel scales calibrated ahead), not scales computed per token as the cache "
                "is written; compile with --kv-int8 (static), or write --format qpass",
                config.kv_cache == "dynamic",
            ),
            (
                "--format vllm-ascend with --fa-quant: vllm-ascend loads attention quantization only as FAKQuant "
                "on MLA models, and never together with C8; drop --fa-quant, or write --format mindie",
                target == "vllm-ascend" and config.fa_quant,
            ),
            (
                "--format vllm-ascend with --kv-int8: vllm-ascend's decode dequantizes the int8 cache with its "
                "scale only, so C8 must be symmetric; add --symmetric",
                target == "vllm-ascend" and config.kv_cache == "static" and not config.symmetric,
            ),
            (
                "--dtype bfloat16 with --kv-int8: MindIE's C8 (int8 KV cache) is documented for float16 weights "
                "only; use --dtype float16, or drop --kv-int8 (FAQuant keeps the cache int8 in bfloat16 too)",
                dtype == "bfloat16" and config.kv_cache == "static",
            ),
            (
                f"--format {target}: the MindIE format is W8A8; add --w8a8 (or a --recipe calibrated with it)",
                not config.w8a8,
            ),
        )
    )


def refusal_vllm_ascend(config, options: dict) -> str | None:
    return refusal(config, options, "vllm-ascend")


def check_target(recipe: Recipe, target: str, dtype: str | None = None) -> None:
    """Refuse what ``target``'s loader cannot run (:func:`refusal`), with the way out."""
    why = refusal(recipe.config, {"dtype": dtype}, target)
    if why:
        raise QpassError(why)


def fused_floats(recipe: Recipe) -> list[str]:
    """Quantized Linears that vllm-ascend, MindIE and vLLM would fuse with a Linear the recipe keeps float: they must be
    float too."""
    quantized, floats = set(recipe.w8a8_linears()), set(recipe.float_linears)
    return sorted({sibling for name in floats for sibling in fused_siblings(name)} & quantized)


CONSUMERS = {"mindie": "MindIE", "vllm-ascend": "vllm-ascend", "vllm": "vLLM"}  # --format -> who fuses the Linears


def check_fused_activations(recipe: Recipe, linears: list[str], fmt: str) -> None:
    """Refuse W8A8 Linears ``linears`` of which fused siblings (q/k/v, gate/up: one layer of one quant type in vLLM,
    vllm-ascend and MindIE) quantize their activations differently, static and per token (:meth:`Recipe.activations`);
    one line naming the first such group, with the way out."""
    written = set(linears)
    mixed = []
    for p in linears:
        group = [s for s in fused_siblings(p) if s in written]
        kinds = {s: recipe.activations(s) for s in group}
        if p == group[0] and len(set(kinds.values())) > 1:
            mixed.append(kinds)
    if mixed:
        kinds = mixed[0]
        static = ", ".join(s for s, k in kinds.items() if k == "static")
        dynamic = ", ".join(s for s, k in kinds.items() if k == "dynamic")
        more = f" ({len(mixed)} such groups)" if len(mixed) > 1 else ""
        raise QpassError(
            f"--format {fmt}: {CONSUMERS[fmt]} runs {', '.join(kinds)} as one fused layer of one quant type, but the "
            f"recipe quantizes {static} with static and {dynamic} with per-token activations{more}; recalibrate (the "
            "auto search keeps each fused group together), or write --format qpass"
        )


def check_names(recipe: Recipe, c8: bool) -> None:
    """Refuse sites whose module names the format cannot express: no attention module, or (for C8) K and V
    projections that are not the separate ``<a>.k_proj`` / ``<a>.v_proj`` modules (fused QKV)."""
    for site in recipe.sites:
        wanted = tuple(f"{site.prefix}.{p}" for p in C8_PROJECTIONS.values())
        if not site.prefix or (c8 and site.projections[1:] != wanted):
            got = ", ".join(p or "?" for p in site.projections)
            raise QpassError(
                f"--format mindie: layer {site.layer}'s attention projects q, k, v with {got}; the MindIE "
                f"format names FAQuant/C8 tensors after an attention module with separate k_proj and "
                f"v_proj Linears, which this architecture does not have; use --format qpass for this model"
            )


def export_mindie(
    config_json: dict,
    state_dict: dict[str, torch.Tensor],
    recipe: Recipe,
    tokenizer,
    out_dir: str | Path,
    dtype: torch.dtype,
    target: str = "mindie",
) -> Path:
    """Write the MindIE directory for a model into ``out_dir`` (created if needed; existing files replaced),
    in the form ``target`` (``mindie`` or ``vllm-ascend``, module docstring) reads.

    ``config_json``: the model's ``config.json`` as a dict, ``architectures`` set. ``state_dict``: HF parameter
    names, float, with the recipe's smoothing already folded in (:func:`qpass.smoothing.apply_smoothing`).
    ``recipe``: W8A8 input qparams (``w8a8.<p>.input_scale/.input_offset``) and, as its config asks, FAQuant / C8
    tensors.
    ``dtype``: the model dtype, ``torch.float16`` or ``torch.bfloat16``.
    """
    linears, tied = _check(config_json, recipe, dtype, target)
    tensors, types = _tensors(state_dict, recipe, linears, recipe.sites, tied, dtype, target)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # one metadata key: safetensors writes a multi-key metadata map in no fixed order
    save_file(
        {k: v.contiguous() for k, v in sorted(tensors.items())}, str(out / WEIGHTS_FILE), metadata={"format": "pt"}
    )
    return _finish(out, config_json, recipe, types, tokenizer, dtype, target)


def export_mindie_by_layer(
    config_json: dict,
    checkpoint: Mapping[str, torch.Tensor],
    recipe: Recipe,
    tokenizer,
    out_dir: str | Path,
    dtype: torch.dtype,
    target: str = "mindie",
) -> Path:
    """:func:`export_mindie` for a model that need not fit in memory: ``checkpoint`` maps every float tensor name to
    its tensor, read when looked up (a layer-wise compile's checkpoint, unsmoothed). Each decoder layer's tensors
    (``model.layers.<i>.``) are read, that layer's smoothing groups folded in, its Linears quantized, and written as
    one shard before the next layer is read; the other tensors (embedding, final norm, LM head) make the last shard.
    The files hold the same tensors as :func:`export_mindie` writes into one (``mindie_format``: the shards, the
    index)."""
    linears, tied = _check(config_json, recipe, dtype, target)
    parts: dict[int | None, list[str]] = {}
    for name in checkpoint:
        parts.setdefault(layer_of(name), []).append(name)
    order = sorted(k for k in parts if k is not None) + ([None] if None in parts else [])
    groups: dict[int | None, list[dict]] = {}
    for g in recipe.smoothing:
        layers = {layer_of(f"{m}.") for m in (g["prev"], *g["consumers"])}
        if len(layers) != 1:
            raise QpassError(
                f"--format {target}: smoothing group of {g['prev']} spans decoder layers {sorted(map(str, layers))}; "
                "a layer-wise export folds smoothing one layer at a time: compile the whole model"
            )
        groups.setdefault(layers.pop(), []).append(g)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    types, weight_map, total = {}, {}, 0
    for i, layer in enumerate(order, start=1):
        state = apply_smoothing(
            {name: checkpoint[name] for name in parts[layer]}, groups.get(layer, []), recipe.tensors
        )
        part_linears = [p for p in linears if layer_of(f"{p}.") == layer]
        sites = [site for site in recipe.sites if site.layer == layer] if layer is not None else []
        tensors, part_types = _tensors(state, recipe, part_linears, sites, tied, dtype, target)
        del state
        shard = shard_name(i, len(order))
        save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(out / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(sorted(tensors), shard))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        types.update(part_types)
        del tensors
    _write_json(
        out / WEIGHTS_INDEX,
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
        sort_keys=False,
    )
    return _finish(out, config_json, recipe, types, tokenizer, dtype, target)


def _check(config_json: dict, recipe: Recipe, dtype: torch.dtype, target: str) -> tuple[list[str], bool]:
    """Refuse what the format or ``target`` cannot hold; the W8A8 Linears to write and whether the LM head is tied."""
    fa, c8 = recipe.config.fa_quant, recipe.config.kv_cache == "static"
    if fa or c8:  # first: a model the format cannot name is refused whatever else the recipe holds
        check_names(recipe, c8)
    names = {v: k for k, v in MODEL_DTYPES.items()}
    check_target(recipe, target, names.get(dtype, str(dtype)))
    demoted = fused_floats(recipe)
    linears = [p for p in recipe.w8a8_linears() if p not in demoted]
    check_fused_activations(recipe, linears, target)
    if not linears:
        raise QpassError(
            "--format mindie: the recipe has no W8A8 Linears (no w8a8.<linear>.input_scale tensors); "
            "compile with --w8a8, or write the qpass format instead"
        )
    tied = bool(config_json.get("tie_word_embeddings"))
    if tied and "lm_head" in linears:
        raise QpassError(
            "recipe quantizes lm_head, but this model ties lm_head to its embeddings; keep lm_head in float"
        )
    return linears, tied


def _tensors(
    state_dict: Mapping[str, torch.Tensor],
    recipe: Recipe,
    linears: list[str],
    sites,
    tied: bool,
    dtype: torch.dtype,
    target: str,
) -> tuple[dict, dict]:
    """The format's tensors and their types for the (smoothed) float tensors ``state_dict``, the W8A8 Linears
    ``linears`` among them and the attention ``sites``."""
    tensors, types, quantized = {}, {}, set()
    for p in linears:
        if f"{p}.weight" not in state_dict:
            raise QpassError(
                f"recipe names W8A8 Linear {p}, but the model has no {p}.weight; use a recipe calibrated for this model"
            )
        if recipe.activations(p) == "dynamic":  # per token: its float bias stays a FLOAT tensor
            made, kind = w8a8_dynamic_tensors(p, state_dict[f"{p}.weight"], dtype), W8A8_DYNAMIC
            quantized.add(f"{p}.weight")
        else:  # static: its bias is in its quant_bias
            made = w8a8_tensors(state_dict[f"{p}.weight"], state_dict.get(f"{p}.bias"), *recipe.linear(p), dtype)
            kind = W8A8
            quantized |= {f"{p}.weight", f"{p}.bias"}
        for suffix, tensor in made.items():
            tensors[f"{p}.{suffix}"], types[f"{p}.{suffix}"] = tensor, kind
    for key, value in state_dict.items():
        if key in quantized or (tied and key == LM_HEAD):
            continue  # a tied lm_head is embed_tokens: loaders tie it again from config.json
        if not value.is_floating_point():
            raise QpassError(f"state_dict tensor {key} is {value.dtype}, not float; give the float model's state dict")
        tensors[key], types[key] = value.detach().to(dtype), FLOAT
    fa, c8 = recipe.config.fa_quant, recipe.config.kv_cache == "static"
    for site in sites:
        a = site.prefix
        if fa:
            for kind in FA_KINDS:
                scale, offset = recipe.get(site.layer, kind)
                tensors[f"{a}.{kind}.scale"], tensors[f"{a}.{kind}.offset"] = scale.to(dtype), offset.to(dtype)
                types[f"{a}.{kind}.scale"] = types[f"{a}.{kind}.offset"] = FAQUANT
        if c8:
            for kind, proj in C8_PROJECTIONS.items():
                scale, offset = recipe.get(site.layer, kind)
                tensors[f"{a}.{proj}.kv_cache_scale"], tensors[f"{a}.{proj}.kv_cache_offset"] = (
                    scale.to(dtype),
                    offset.to(dtype),
                )
                types[f"{a}.{proj}.kv_cache_scale"] = types[f"{a}.{proj}.kv_cache_offset"] = (
                    C8 if target == "vllm-ascend" else W8A8
                )
    return tensors, types


def _finish(
    out: Path, config_json: dict, recipe: Recipe, types: dict, tokenizer, dtype: torch.dtype, target: str
) -> Path:
    """The description, config.json and the tokenizer files beside the weights."""
    name = next(k for k, v in MODEL_DTYPES.items() if v == dtype)
    fa, c8 = recipe.config.fa_quant, recipe.config.kv_cache == "static"
    description = {"model_quant_type": W8A8_DYNAMIC if recipe.config.w8a8 == "dynamic" else W8A8}
    if fa:
        description["fa_quant_type"] = FAQUANT
    if c8:
        description["kv_cache_type"] = description["kv_quant_type"] = C8
    if target == "vllm-ascend" and LM_HEAD not in types:
        types[LM_HEAD] = FLOAT  # vLLM builds the LM head and asks for its type even when it is tied
    description.update(sorted(types.items()))
    config = dict(config_json)
    config["torch_dtype"] = name
    if "dtype" in config:  # transformers 5 writes `dtype`; keep the two from disagreeing
        config["dtype"] = name
    config.pop("quantization_config", None)  # vllm-ascend: the description decides (a GGUF-made config has one too)
    if target == "mindie":
        config["quantization_config"] = {
            k: v for k, v in (("fa_quant_type", FAQUANT if fa else None), ("kv_quant_type", C8 if c8 else None)) if v
        }
    _write_json(out / DESCRIPTION_FILE, description, sort_keys=False)
    _write_json(out / CONFIG_FILE, config, sort_keys=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
        _write_json(out / CONFIG_FILE, config, sort_keys=True)  # some tokenizers write a config.json of their own
    return out


def w8a8_tensors(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    input_scale: torch.Tensor,
    input_offset: torch.Tensor,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """The format's tensors of one W8A8 Linear (suffix -> tensor), for model dtype ``dtype``.

    ``input_scale`` is rounded to ``dtype`` first and ``deq_scale`` computed from the rounded value, so that
    ``xq = round(x / input_scale + input_offset)`` and ``deq_scale`` agree exactly as a runtime reads them.
    """
    scale = input_scale.reshape(-1)[:1].to(dtype).float()
    offset = torch.round(input_offset.reshape(-1)[:1].float())
    if not (torch.isfinite(scale).all() and scale.item() > 0):
        raise QpassError(
            f"W8A8 input_scale {input_scale.tolist()} becomes {scale.item()} in {dtype}; "
            "recalibrate (the activation range is empty or out of the model dtype's range)"
        )
    w = w8a8_weights(weight, bias, scale.item(), offset.item())
    n = w.weight.shape[0]
    deq = w.deq_scale.view(torch.int32).to(torch.int64) if dtype == torch.float16 else w.deq_scale.clone()
    return {
        "weight": w.weight,
        "input_scale": scale.to(dtype),
        "input_offset": offset.to(dtype),
        "deq_scale": deq,
        "quant_bias": w.quant_bias,
        "weight_scale": w.weight_scale.reshape(n, 1).float(),
        "weight_offset": torch.zeros(n, 1, dtype=torch.float32),
    }


def w8a8_dynamic_tensors(p: str, weight: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The format's tensors of one W8A8_DYNAMIC Linear ``p`` (suffix -> tensor), for model dtype ``dtype``.

    The per-channel scale is rounded to ``dtype`` first (the format stores it so) and the weight quantized with the
    rounded scale, so that ``weight * weight_scale`` is what a runtime reads. A row of zeros gets scale 1.
    """
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax)).to(dtype).float()
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise QpassError(
            f"{p}.weight row {i}: its int8 scale {float(amax[i]) / QMAX:.3g} is not a positive finite {dtype} number; "
            "write a wider --dtype (float16's smallest is 6e-8), or keep this Linear float"
        )
    n = w.shape[0]
    return {
        "weight": torch.round(w / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8),
        "weight_scale": scale.reshape(n, 1).to(dtype),
        "weight_offset": torch.zeros(n, 1, dtype=dtype),
    }


def _write_json(path: Path, doc: dict, sort_keys: bool) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=sort_keys) + "\n", encoding="utf-8")


FILES = (
    "quant_model_weight_w8a8.safetensors (layer-wise: its shards and index), quant_model_description.json, "
    "config.json, tokenizer, report.json, report.txt, report.png"
)


def write(compiled, directory: Path, options: dict, target: str = "mindie") -> None:
    """The exporter's entry point: smoothing folded into the float weights, then :func:`export_mindie` (a layer-wise
    compile's checkpoint: :func:`export_mindie_by_layer`, which folds it layer by layer); the report records the
    target and any Linear made float for fusion (``export``)."""
    from qpass.core import report as reporting

    dtype = options.get("dtype") or "float16"
    check_target(compiled.recipe, target, dtype)
    recipe = compiled.recipe
    if compiled.layerwise:  # a layer-wise compile: its checkpoint is read one decoder layer at a time
        export_mindie_by_layer(
            compiled.config_json,
            compiled.state_dict,
            recipe,
            compiled.tokenizer,
            directory,
            MODEL_DTYPES[dtype],
            target,
        )
    else:
        state = apply_smoothing(compiled.state_dict, recipe.smoothing, recipe.tensors)
        export_mindie(compiled.config_json, state, recipe, compiled.tokenizer, directory, MODEL_DTYPES[dtype], target)
    export = {"format": target, "dtype": dtype, "float_for_fusion": fused_floats(recipe)}
    reporting.write({**compiled.report, "export": export}, directory)


def write_vllm_ascend(compiled, directory: Path, options: dict) -> None:
    write(compiled, directory, options, target="vllm-ascend")
