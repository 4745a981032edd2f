"""``--format vllm``: a Hugging Face-style directory that vLLM serves (``vllm serve DIR``), and that qpass reads back.

    config.json              the model's config with a ``quantization_config`` (below) and ``torch_dtype``
    model.safetensors        the weights: float, or W8A8 in compressed-tensors' form; the attention grids
    generation_config.json   the model's generation defaults
    tokenizer files          the model's tokenizer
    report.json / .txt / .png

``quantization_config``:

- W8A8 alone: compressed-tensors' own (``quant_method: compressed-tensors``, ``format: int-quantized``): int8
  weights per output channel (``weight`` int8 ``[out, in]``, ``weight_scale`` float32 ``[out, 1]``), static int8
  activations per tensor with a zero point (``input_scale`` float32 ``[1]``, ``input_zero_point`` int8 ``[1]``),
  the float Linears and ``lm_head`` in ``ignore``. Smoothing is folded into the weights and norms, so stock vLLM
  loads it with no plugin. Dynamic W8A8 (``--w8a8 dynamic``): the same weights, activations ``dynamic: true,
  strategy: token, symmetric: true`` (each token's scale computed at run time), so no ``input_scale`` /
  ``input_zero_point``.
  Static W8A8 with per-token Linears (the recipe's ``w8a8.dynamic_linears``): two config groups, ``group_0`` the
  static activations above, ``group_1`` the per-token ones, each listing its Linears by exact module path
  (``model.layers.0.mlp.down_proj``). Not the class name ``Linear``: vLLM gives a layer the first target equal to
  its name (or matching it as ``re:``), then, for q/k/v and gate/up fused into one layer, its first shard's target if
  every shard matches one, then a class-name target contained in the layer's class (vLLM 0.32,
  ``compressed_tensors/utils.py`` ``find_matched_target``; older versions tried the class name before the fused
  shards: llm-compressor issue #2730), so a ``Linear`` target in one group would take fused layers the other group
  names; exact paths resolve every layer, fused or not, to its own group in either order, and vLLM renames them
  with a model's own weight mapping, which it does not do to ``re:`` patterns. A fused group (q/k/v, gate/up) whose
  Linears the recipe quantizes both ways is refused: vLLM runs one scheme per fused layer. The reader resolves each
  Linear's group the way vLLM does (:func:`_schemes`) and reads it by that group's scheme.
- attention quantization (C8, the dynamic cache, FAQuant): ``{"quant_method": "qpass", "format_version": 1,
  "kv_cache": "static" | "dynamic" | null, "fa_quant": bool, "symmetric": bool, "linear": <the compressed-tensors
  dict above> | null}``,
  which qpass's vLLM plugin (:mod:`qpass.vllm`) registers. Each attention layer's grids are float32 tensors beside
  its weights, at vLLM's attention module ``<attention>.attn`` (for example ``model.layers.0.self_attn.attn``):
  ``qpass_c8_key_scale`` / ``_offset`` and ``qpass_c8_value_scale`` / ``_offset`` ``[kv_heads * head_dim]``
  (C8); ``qpass_fa_query_*`` ``[heads * head_dim]``, ``qpass_fa_key_*`` and ``qpass_fa_value_*``
  ``[kv_heads * head_dim]`` (FAQuant), flat and head-major so that each tensor-parallel rank loads its heads'
  rows. ``x ~= (code - offset) * scale``, ``code = clamp(round(x / scale) + offset, -128, 127)``. The dynamic cache
  has no tensors: its scale and offset per token and kv head are computed as the cache is written.
"""

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qpass.core.config import QuantConfig
from qpass.core.errors import QpassError
from qpass.core.naming import FUSED_LINEARS, LM_HEAD, fused_siblings
from qpass.core.recipe import Recipe, SiteGeometry, site_key
from qpass.core.smoothing import apply_smoothing
from qpass.exporters.base import Loaded, first_refusal
from qpass.exporters.mindie_load import build_model, natural
from qpass.exporters.mindie_write import check_fused_activations, fused_floats
from qpass.models.loaders import load_tokenizer
from qpass.runtime.w8a8 import (
    W8A8DynamicLinear,
    W8A8DynamicWeights,
    W8A8Linear,
    W8A8Weights,
    w8a8_dynamic_weights,
    w8a8_weights,
)

QUANT_METHOD = "qpass"
FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, GENERATION_FILE = "config.json", "model.safetensors", "generation_config.json"
MODEL_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FILES = "config.json, model.safetensors, generation_config.json, tokenizer, report.json, report.txt, report.png"
# recipe kind -> (checkpoint name, the heads it has: q or kv)
GRIDS = {
    "kv_k": ("qpass_c8_key", "kv"),
    "kv_v": ("qpass_c8_value", "kv"),
    "fa_q": ("qpass_fa_query", "q"),
    "fa_k": ("qpass_fa_key", "kv"),
    "fa_v": ("qpass_fa_value", "kv"),
}
W8A8_TENSORS = ("weight", "weight_scale", "input_scale", "input_zero_point")
VLLM_FUSED = dict(zip(FUSED_LINEARS, ("qkv_proj", "gate_up_proj")))  # the Linears vLLM fuses -> the fused layer's name
WEIGHTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
ACTIVATIONS = {  # a W8A8 Linear's input_activations: static (calibrated) or dynamic (per token)
    "static": {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "tensor", "dynamic": False},
    "dynamic": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True},
}


def refusal(config, options: dict) -> str | None:
    """What a vLLM directory cannot hold under the policy ``config`` with ``options``, in one line with the way out."""
    dtype = options.get("dtype") or "float32"
    return first_refusal(
        (
            (
                "--format vllm: an ONNX input is written as ONNX (its weights stay in its graph); drop --format, "
                "or compile the PyTorch model for this format",
                options.get("frontend") == "onnx",
            ),
            (
                f"--dtype {dtype}: --format vllm stores {', '.join(MODEL_DTYPES)} weights; choose one of those",
                dtype not in MODEL_DTYPES,
            ),
        )
    )


def quantization_config(recipe: Recipe, linear: dict | None) -> dict:
    """The ``quantization_config`` of a directory with ``recipe``'s policy and the compressed-tensors ``linear``."""
    c = recipe.config
    if not (c.fa_quant or c.kv_cache):
        return linear
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "kv_cache": c.kv_cache,
        "fa_quant": bool(c.fa_quant),
        "symmetric": bool(c.symmetric),
        "linear": linear,
    }


def check_quantization_config(doc) -> str | None:
    """What is wrong with a ``qpass`` ``quantization_config`` (one line with the way out), or None."""
    if not isinstance(doc, dict):
        return "quantization_config is not a JSON object; recompile the directory with qpass --format vllm"
    version = doc.get("format_version")
    return first_refusal(
        (
            (
                f"quantization_config format_version {version!r}: this qpass reads version {FORMAT_VERSION}; "
                "recompile the directory with this qpass, or install the qpass that wrote it",
                version != FORMAT_VERSION,
            ),
            (
                f"quantization_config kv_cache {doc.get('kv_cache')!r}: qpass's vLLM backend runs "
                '"static", "dynamic" or null',
                doc.get("kv_cache") not in ("static", "dynamic", None),
            ),
            (
                "quantization_config has fa_quant with the dynamic cache, which qpass's vLLM backend does not run; "
                "recompile with one of the two",
                doc.get("kv_cache") == "dynamic" and doc.get("fa_quant") is True,
            ),
            (
                f"quantization_config fa_quant {doc.get('fa_quant')!r}: it must be true or false",
                not isinstance(doc.get("fa_quant"), bool),
            ),
            (
                "quantization_config quantizes no attention (kv_cache null, fa_quant false); a W8A8-only directory "
                "carries compressed-tensors' config instead: recompile it",
                doc.get("kv_cache") is None and not doc.get("fa_quant"),
            ),
            (
                "quantization_config linear is neither null nor a compressed-tensors config; recompile the directory",
                doc.get("linear") is not None
                and not (isinstance(doc["linear"], dict) and doc["linear"].get("quant_method") == "compressed-tensors"),
            ),
        )
    )


def attention_tensors(doc: dict) -> dict[str, str]:
    """The attention layer's checkpoint tensors under ``doc`` (a ``qpass`` quantization_config): name -> "q"/"kv"."""
    kinds = (["kv_k", "kv_v"] if doc.get("kv_cache") == "static" else []) + (
        ["fa_q", "fa_k", "fa_v"] if doc.get("fa_quant") else []
    )
    return {f"{GRIDS[k][0]}_{part}": GRIDS[k][1] for k in kinds for part in ("scale", "offset")}


def _linear_config(static: list[str], dynamic: list[str], floats: list[str]) -> dict | None:
    """compressed-tensors' config for W8A8 Linears (symmetric per-channel weights), ``static`` ones with static
    asymmetric per-tensor activations and ``dynamic`` ones with symmetric per-token activations computed at run time,
    with ``floats`` and ``lm_head`` ignored. One kind: one group targeting the class ``Linear``; both: one group each,
    targeting its Linears by exact module path (the module docstring says why)."""
    if not (static or dynamic):
        return None
    if static and dynamic:
        groups = [("static", sorted(static, key=natural)), ("dynamic", sorted(dynamic, key=natural))]
    else:
        groups = [("dynamic" if dynamic else "static", ["Linear"])]
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            f"group_{i}": {"targets": targets, "weights": WEIGHTS, "input_activations": ACTIVATIONS[kind]}
            for i, (kind, targets) in enumerate(groups)
        },
        "ignore": sorted({LM_HEAD.removesuffix(".weight"), *floats}),
    }


def write(compiled, directory: Path, options: dict) -> None:
    """The directory of the module docstring from a :class:`Compiled` (smoothing folded into the float weights)."""
    from qpass.core import report as reporting

    why = refusal(compiled.recipe.config, options)
    if why:
        raise QpassError(why)
    dtype_name = options.get("dtype") or "float32"
    dtype, recipe = MODEL_DTYPES[dtype_name], compiled.recipe
    skipped = compiled.report.get("decoder", {}).get("skipped", "")
    if (recipe.config.fa_quant or recipe.config.kv_cache) and not compiled.layerwise and skipped:
        raise QpassError(
            f"--format vllm: qpass's vLLM backend runs the paged int8 attention this model's attention cannot be "
            f"lowered to ({skipped.split(';')[0]}); write --format qpass, or --format vllm with --w8a8 alone"
        )
    state = apply_smoothing(dict(compiled.state_dict.items()), recipe.smoothing, recipe.tensors)
    demoted = fused_floats(recipe)  # vLLM fuses q/k/v and gate/up: one scheme per fused Linear
    linears = [p for p in recipe.w8a8_linears() if p not in demoted]
    check_fused_activations(recipe, linears, "vllm")
    dynamic = [p for p in linears if recipe.activations(p) == "dynamic"]
    all_linears = {k.removesuffix(".weight") for k in state if k.endswith(".weight") and state[k].dim() == 2}
    floats = sorted((all_linears - set(linears)) - {LM_HEAD.removesuffix(".weight")}) if linears else []
    tensors = {}
    for key, value in state.items():
        if key.removesuffix(".weight") in linears or key.removesuffix(".bias") in linears and key.endswith(".bias"):
            continue
        tied = compiled.config_json.get("tie_word_embeddings") and key == LM_HEAD
        if not tied:
            tensors[key] = value.detach().to(dtype)
    for p in linears:
        tensors.update(_w8a8_tensors(p, state, *(None, None) if p in dynamic else recipe.linear(p), dtype))
    for site in recipe.sites:
        for kind, (name, _) in GRIDS.items():
            if site_key(site.layer, kind, "scale") in recipe.tensors:
                scale, offset = recipe.get(site.layer, kind)
                tensors[f"{site.prefix}.attn.{name}_scale"] = scale.float().reshape(-1).contiguous()
                tensors[f"{site.prefix}.attn.{name}_offset"] = offset.float().reshape(-1).contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(directory / WEIGHTS_FILE), {"format": "pt"})
    config = dict(compiled.config_json)
    config["torch_dtype"] = dtype_name
    config.pop("dtype", None)
    static = [p for p in linears if p not in dynamic]
    qc = quantization_config(recipe, _linear_config(static, dynamic, floats))
    if qc is None:
        config.pop("quantization_config", None)
    else:
        config["quantization_config"] = qc
    if compiled.tokenizer is not None:
        compiled.tokenizer.save_pretrained(str(directory))
    _write_json(directory / CONFIG_FILE, config)  # after the tokenizer, which may write a config.json of its own
    _write_json(directory / GENERATION_FILE, _generation_config(compiled.config_json))
    export = {"format": "vllm", "dtype": dtype_name, "float_for_fusion": demoted}
    reporting.write({**compiled.report, "export": export}, directory)


def _w8a8_tensors(p: str, state: dict, input_scale, input_offset, dtype) -> dict[str, torch.Tensor]:
    """W8A8 Linear ``p``'s tensors; ``input_scale`` None for dynamic activations (weight and weight_scale only)."""
    if f"{p}.weight" not in state:
        raise QpassError(
            f"recipe names W8A8 Linear {p}, but the model has no {p}.weight; use a recipe calibrated for this model"
        )
    if input_scale is None:
        w = w8a8_dynamic_weights(state[f"{p}.weight"], None)
        out = {f"{p}.weight": w.weight, f"{p}.weight_scale": w.weight_scale.reshape(-1, 1).float()}
        if state.get(f"{p}.bias") is not None:
            out[f"{p}.bias"] = state[f"{p}.bias"].detach().to(dtype)
        return out
    scale, offset = input_scale.reshape(-1)[:1].float(), torch.round(input_offset.reshape(-1)[:1].float())
    w = w8a8_weights(state[f"{p}.weight"], None, scale.item(), offset.item())
    out = {
        f"{p}.weight": w.weight,
        f"{p}.weight_scale": w.weight_scale.reshape(-1, 1).float(),
        f"{p}.input_scale": scale,
        f"{p}.input_zero_point": offset.to(torch.int8),
    }
    if state.get(f"{p}.bias") is not None:
        out[f"{p}.bias"] = state[f"{p}.bias"].detach().to(dtype)
    return out


def _generation_config(config_json: dict) -> dict:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: config_json[k] for k in keys if config_json.get(k) is not None}


def _write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def detect(path: Path) -> bool:
    """A directory whose config.json names qpass's or compressed-tensors' quantization beside model.safetensors."""
    path = Path(path)
    if not ((path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()):
        return False
    try:
        qc = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")).get("quantization_config")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") in (QUANT_METHOD, "compressed-tensors")


def load(path: Path, purpose: str = "eval", build: bool = True) -> Loaded:
    """The Hugging Face model of a vLLM directory (W8A8 Linears as :class:`W8A8Linear`, computing in float32) with
    the recipe of its attention grids, for ``qpass eval`` / ``qpass run``; ``purpose`` does not change what is read.
    Every tensor is checked against the config (``build=False`` checks without keeping them)."""
    d = Path(path)
    config_json = _read_config(d)
    qc = config_json["quantization_config"]
    if qc.get("quant_method") == QUANT_METHOD:
        why = check_quantization_config(qc)
        if why:
            raise QpassError(f"{d}: {why}")
        attention, linear = qc, qc.get("linear")
    else:
        attention, linear = {"kv_cache": None, "fa_quant": False}, qc
    try:
        reader = safe_open(str(d / WEIGHTS_FILE), framework="pt")
        names = set(reader.keys())
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise QpassError(f"{d}: cannot read {WEIGHTS_FILE} ({err}); recompile the directory") from None
    config, model = build_model(d, config_json, torch.float32, build)
    schemes = _schemes(d, linear, model)  # each W8A8 Linear's scheme, by the config group vLLM gives it
    stray = sorted(n.removesuffix(".weight_scale") for n in names if n.endswith(".weight_scale"))  # W8A8 tensors
    stray = [p for p in stray if p not in schemes]
    if stray and linear is None:
        raise QpassError(f"{d}: {WEIGHTS_FILE} holds W8A8 Linears but config.json no compressed-tensors config")
    if stray:
        raise QpassError(
            f"{d}: {stray[0]} holds W8A8 tensors, but config.json's quantization_config ignores it or targets it with "
            f"no config group, so vLLM would run it float ({len(stray)} such); recompile the directory"
        )
    w8a8 = sorted(schemes, key=natural)
    used = set()
    for p in w8a8:
        if schemes[p] == "dynamic":
            weights = _read_w8a8_dynamic(d, reader, names, p, model)
            made = W8A8DynamicLinear(weights)
        else:
            weights = _read_w8a8(d, reader, p, model)
            made = W8A8Linear(weights)
        used |= {f"{p}.{s}" for s in (*W8A8_TENSORS, "bias")}
        if build:
            parent, _, child = p.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, made)
    floats, tied = {}, bool(config_json.get("tie_word_embeddings"))
    for key, param in model.state_dict().items():
        if key.rpartition(".")[0] in w8a8:
            continue  # a W8A8 Linear: its tensors were read above
        if tied and key == LM_HEAD:
            continue
        if key not in names:
            raise QpassError(f"{d}: {WEIGHTS_FILE} has no tensor {key}; recompile the directory")
        t = reader.get_tensor(key)
        if tuple(t.shape) != tuple(param.shape) or not t.is_floating_point():
            raise QpassError(
                f"{d}: tensor {key} is {t.dtype} {list(t.shape)}, expected float {list(param.shape)}; recompile"
            )
        used.add(key)
        if build:
            floats[key] = t.float()
    if build:
        model.load_state_dict(floats, strict=False)
        if tied:
            model.tie_weights()
    recipe = _recipe(d, reader, names, config, attention)
    used |= {n for n in names if ".attn.qpass_" in n}
    unknown = sorted(names - used)
    if unknown:
        raise QpassError(f"{d}: tensor {unknown[0]} is not a parameter of this model ({len(unknown)} such); recompile")
    tokenizer = load_tokenizer(d, str(d), "recompile the directory (it writes the tokenizer)") if build else None
    info = {"format": "vllm", "w8a8_linears": len(w8a8), "fa_quant": attention["fa_quant"]}
    info["kv_cache"] = attention["kv_cache"]
    return Loaded("vllm", tokenizer, recipe, model=model if build else None, info=info)


def check(directory: Path) -> None:
    """Re-read a directory just written: its config, every tensor's name, dtype and shape, every grid; the
    tokenizer."""
    load(directory, build=False)
    load_tokenizer(Path(directory), str(directory), "recompile the directory")


def _read_config(d: Path) -> dict:
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if not (d / f).is_file():
            raise QpassError(f"{d}: no {f}; a vLLM directory written by qpass has {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        doc = json.loads((d / CONFIG_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise QpassError(f"{d}: {CONFIG_FILE} is not valid JSON ({err}); recompile the directory") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("quantization_config"), dict):
        raise QpassError(f"{d}: {CONFIG_FILE} has no quantization_config; give a directory qpass wrote")
    return doc


def _schemes(d: Path, linear: dict | None, model: torch.nn.Module) -> dict[str, str]:
    """The scheme vLLM runs each W8A8 Linear of ``model`` with under the compressed-tensors config ``linear``: module
    path -> ``static`` or ``dynamic`` (:data:`ACTIVATIONS`), for the Linears it quantizes (the others run float).

    As vLLM resolves it (``compressed_tensors/utils.py`` ``find_matched_target``, ``should_ignore_layer``): a layer is
    a Linear, or q/k/v and gate/up fused into one (``qkv_proj``, ``gate_up_proj``); an ignored one runs float (a fused
    layer must be ignored whole); else its config group is that of the first target equal to its name or matching it
    as ``re:``, else, for a fused layer whose shards all match targets, its first shard's, else that of a class-name
    target (``Linear`` matches every Linear layer, not the LM head). Refused in one line: input activations qpass does
    not run, a class-name target other than ``Linear`` or ``Linear`` beside other targets (vLLM versions order the
    class-name and fused steps differently), a target in two groups, a fused layer ignored in part, or one whose shards
    the groups target differently (vLLM would run them all with the first shard's)."""
    if linear is None:
        return {}
    fix = "recompile the directory"
    try:
        targets: list[tuple[str, str]] = []
        for group in linear["config_groups"].values():
            kind = _activations(d, group["input_activations"])
            targets += [(t, kind) for t in group["targets"]]
        ignore = list(linear.get("ignore") or [])
        if not all(isinstance(t, str) for t, _ in targets) or not all(isinstance(t, str) for t in ignore):
            raise TypeError("targets and ignore must be strings")
    except (KeyError, TypeError, ValueError, AttributeError):
        raise QpassError(
            f"{d}: {CONFIG_FILE} quantization_config is not the compressed-tensors config qpass writes (config groups "
            f"with targets and input_activations, an ignore list); {fix}"
        ) from None
    kinds = dict(targets)
    if len(kinds) != len(targets):
        twice = next(t for i, (t, _) in enumerate(targets) if t in [u for u, _ in targets[:i]])
        raise QpassError(f"{d}: {CONFIG_FILE} quantization_config targets {twice!r} in two config groups; {fix}")
    classes = [t for t in kinds if "." not in t and not t.startswith("re:")]
    if classes and (classes != ["Linear"] or len(kinds) > 1):
        raise QpassError(
            f"{d}: {CONFIG_FILE} quantization_config targets {', '.join(map(repr, kinds))}; qpass reads the class "
            f"name 'Linear' as the one target of one group, or module paths and re: patterns; {fix}"
        )

    def match(name: str, patterns) -> str | None:
        return next((t for t in patterns if t == name or (t.startswith("re:") and re.match(t[3:], name))), None)

    present = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    layers: dict[str, list[str]] = {}  # vLLM's layer name -> its Linears
    for n in sorted(present, key=natural):
        group = fused_siblings(n)
        leaves = tuple(s.rpartition(".")[2] for s in group)
        fused = leaves in VLLM_FUSED and all(s in present for s in group)
        layers.setdefault(f"{n.rpartition('.')[0]}.{VLLM_FUSED[leaves]}" if fused else n, group if fused else [n])
    out = {}
    for name, shards in layers.items():
        ignored = [True] if match(name, ignore) else [match(s, ignore) is not None for s in shards]
        if any(ignored) and not all(ignored):
            raise QpassError(
                f"{d}: {CONFIG_FILE} quantization_config ignores {shards[ignored.index(True)]} but not "
                f"{shards[ignored.index(False)]}, which vLLM runs as one layer ({name}) and refuses; {fix}"
            )
        if all(ignored):
            continue
        target = match(name, kinds)
        if target is None and len(shards) > 1 and all(hits := [match(s, kinds) for s in shards]):
            if len({kinds[h] for h in hits}) > 1:
                raise QpassError(
                    f"{d}: {CONFIG_FILE} quantization_config gives {', '.join(shards)} different config groups "
                    f"({', '.join(kinds[h] for h in hits)}), but vLLM runs them as one layer ({name}) with the first's "
                    f"scheme; {fix}"
                )
            target = hits[0]
        if target is None and classes and name != LM_HEAD.removesuffix(".weight"):
            target = "Linear"
        if target is not None:
            out.update(dict.fromkeys(shards, kinds[target]))
    return out


def _activations(d: Path, act: dict) -> str:
    """``static`` or ``dynamic``: which of :data:`ACTIVATIONS` the compressed-tensors ``input_activations`` ``act``
    are; one line naming anything else."""
    kind = next((k for k, want in ACTIVATIONS.items() if all(act.get(f) == v for f, v in want.items())), None)
    if kind is None:
        raise QpassError(
            f"{d}: {CONFIG_FILE} input_activations {act} is not one qpass reads (8-bit int, static asymmetric per "
            "tensor or dynamic symmetric per token); recompile the directory"
        )
    return kind


def _read_w8a8_dynamic(d: Path, reader, names: set, p: str, model) -> W8A8DynamicWeights:
    """W8A8 Linear ``p`` with dynamic per-token activations: int8 ``weight [n, k]``, float32 ``weight_scale [n, 1]``
    (positive), its float ``bias`` when the Linear has one; no activation tensors."""
    module = _linear(d, model, p)
    n, k = module.out_features, module.in_features
    for stray in (f"{p}.input_scale", f"{p}.input_zero_point"):
        if stray in names:
            raise QpassError(
                f"{d}: tensor {stray} beside dynamic per-token activations (config.json); recompile the directory"
            )
    t = {}
    for suffix, (dtype, shape) in {"weight": (torch.int8, (n, k)), "weight_scale": (torch.float32, (n, 1))}.items():
        name = f"{p}.{suffix}"
        if name not in names:
            raise QpassError(f"{d}: missing tensor {name}; recompile the directory")
        t[suffix] = reader.get_tensor(name)
        if t[suffix].dtype != dtype or tuple(t[suffix].shape) != shape:
            raise QpassError(
                f"{d}: tensor {name} is {t[suffix].dtype} {list(t[suffix].shape)}, expected {dtype} {list(shape)}"
            )
    w_scale = t["weight_scale"].reshape(n)
    if not (torch.isfinite(w_scale).all() and (w_scale > 0).all()):
        raise QpassError(f"{d}: tensor {p}.weight_scale has a value that is not a positive finite number; recompile")
    bias = torch.zeros(n)
    if module.bias is not None:
        if f"{p}.bias" not in names:
            raise QpassError(f"{d}: missing tensor {p}.bias; recompile the directory")
        bias = reader.get_tensor(f"{p}.bias").float()
    return W8A8DynamicWeights(t["weight"], w_scale, bias)


def _linear(d: Path, model, p: str) -> torch.nn.Linear:
    try:
        module = model.get_submodule(p)
    except AttributeError:
        module = None
    if not isinstance(module, torch.nn.Linear):
        raise QpassError(f"{d}: {p} holds W8A8 tensors but is not a Linear of this model; recompile the directory")
    return module


def _read_w8a8(d: Path, reader, p: str, model) -> W8A8Weights:
    module = _linear(d, model, p)
    n, k = module.out_features, module.in_features
    want = {
        "weight": (torch.int8, (n, k)),
        "weight_scale": (torch.float32, (n, 1)),
        "input_scale": (torch.float32, (1,)),
        "input_zero_point": (torch.int8, (1,)),
    }
    t = {}
    for suffix, (dtype, shape) in want.items():
        name = f"{p}.{suffix}"
        try:
            t[suffix] = reader.get_tensor(name)
        except Exception:  # safetensors' own error for a missing name
            raise QpassError(f"{d}: missing tensor {name}; recompile the directory") from None
        if t[suffix].dtype != dtype or tuple(t[suffix].shape) != shape:
            raise QpassError(
                f"{d}: tensor {name} is {t[suffix].dtype} {list(t[suffix].shape)}, expected {dtype} {list(shape)}"
            )
    w_scale, in_scale = t["weight_scale"].reshape(n), t["input_scale"]
    for name, s in ((f"{p}.weight_scale", w_scale), (f"{p}.input_scale", in_scale)):
        if not (torch.isfinite(s).all() and (s > 0).all()):
            raise QpassError(f"{d}: tensor {name} has a value that is not a positive finite number; recalibrate")
    bias = None
    if module.bias is not None:
        bias = reader.get_tensor(f"{p}.bias").float()
    zp = t["input_zero_point"].float()
    b = torch.zeros(n) if bias is None else bias.double()
    deq = (in_scale * w_scale).float()
    correction = t["weight"].to(torch.int64).sum(dim=1).double() * zp.double()
    quant_bias = torch.round(b / deq.double() - correction).clamp(-(2**31), 2**31 - 1).to(torch.int32)
    return W8A8Weights(t["weight"], w_scale, in_scale, zp, deq, quant_bias)


def _recipe(d: Path, reader, names: set, config, attention: dict) -> Recipe | None:
    """The recipe of the directory's attention quantization (None without any), one site per layer: the grids of C8 /
    FAQuant from their tensors; the dynamic cache has none."""
    if not (attention["kv_cache"] or attention["fa_quant"]):
        return None
    kinds = (["kv_k", "kv_v"] if attention["kv_cache"] == "static" else []) + (
        ["fa_q", "fa_k", "fa_v"] if attention["fa_quant"] else []
    )
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    prefixes = sorted({n.partition(".attn.qpass_")[0] for n in names if ".attn.qpass_" in n}, key=natural)
    if kinds and len(prefixes) != config.num_hidden_layers:
        raise QpassError(
            f"{d}: grids for {len(prefixes)} attention layers in {WEIGHTS_FILE}, for {config.num_hidden_layers} "
            "layers in config.json; each attention needs its grids: recompile the directory"
        )
    tensors = {}
    for i, a in enumerate(prefixes):
        for kind in kinds:
            name, which = GRIDS[kind]
            h = heads if which == "q" else kv_heads
            for part in ("scale", "offset"):
                key = f"{a}.attn.{name}_{part}"
                if key not in names:
                    raise QpassError(f"{d}: missing tensor {key}; recompile the directory")
                t = reader.get_tensor(key)
                if t.dtype != torch.float32 or tuple(t.shape) != (h * head_dim,) or not torch.isfinite(t).all():
                    raise QpassError(
                        f"{d}: tensor {key} is {t.dtype} {list(t.shape)}; expected finite float32 [{h * head_dim}]"
                    )
                if part == "scale" and not (t > 0).all():
                    raise QpassError(f"{d}: tensor {key} has a scale that is not positive; recalibrate")
                tensors[site_key(i, kind, part)] = t.reshape(h, head_dim) if kind.startswith("fa") else t
    prefixes = prefixes or [""] * config.num_hidden_layers
    sites = [SiteGeometry(i, heads, kv_heads, head_dim, a) for i, a in enumerate(prefixes)]
    policy = QuantConfig(fa_quant=attention["fa_quant"], kv_cache=attention["kv_cache"])
    return Recipe(policy, sites, tensors)
