"""The Ascend MindIE quantized weight directory (``../shared/FORMATS.md`` section 1): write it, and load it back
into a Hugging Face model that runs the format's integer arithmetic on the CPU.

A directory holds ``config.json`` (with ``quantization_config``), ``quant_model_weight_w8a8.safetensors``
(every tensor, float ones included), ``quant_model_description.json`` (tensor name -> ``FLOAT`` / ``W8A8`` /
``FAQuant`` plus the model-level keys) and the tokenizer files. Per quantized Linear ``<p>``:

    <p>.weight        int8                 [n, k]   symmetric per output channel
    <p>.input_scale   model dtype          [1]      per-tensor activation scale
    <p>.input_offset  model dtype          [1]      activation offset (an integer value)
    <p>.deq_scale     int64 (float16 model: the float32 bits of input_scale * weight_scale as int32, widened)
                      float32 (bfloat16 model)                                      [n]
    <p>.quant_bias    int32                [n]      round(bias / deq_scale - sum_k Wq[n, k] * input_offset)
    <p>.weight_scale, <p>.weight_offset  float32  [n, 1]   (offset 0)

Per layer ``<a>`` = ``model.layers.<i>.self_attn``: FAQuant ``<a>.fa_q.scale/.offset [q_heads, head_dim]``,
``<a>.fa_k|fa_v.scale/.offset [kv_heads, head_dim]``; C8 ``<a>.k_proj|v_proj.kv_cache_scale/_offset
[kv_heads * head_dim]``; all in the model dtype.

Offsets, sign convention: this module writes and reads msModelSlim's convention, which is also qpass's
(``qpass/recipe.py``): ``q = clamp(round(x / scale) + offset)``, ``x = (q - offset) * scale``. Offsets are
therefore copied between a recipe and the files unchanged. (Ascend's kernels compute ``(q + offset) * scale``;
MindIE negates the offsets when it loads them, so files must not be pre-negated.)

The loader computes in float32 by default: float16 / bfloat16 values widen to float32 exactly, so the model
it builds is the exported one, with W8A8 Linears in int8 x int8 -> int32 (:class:`qpass.runtime.w8a8.W8A8Linear`)
and FAQuant / C8 applied by qpass's passes from the :class:`Recipe` it returns.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qpass.config import QuantConfig
from qpass.errors import QpassError
from qpass.recipe import Recipe, SiteGeometry
from qpass.runtime.w8a8 import W8A8Linear, W8A8Weights, w8a8_weights

WEIGHTS_FILE = "quant_model_weight_w8a8.safetensors"
DESCRIPTION_FILE = "quant_model_description.json"
CONFIG_FILE = "config.json"
MODEL_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
FLOAT, W8A8, FAQUANT = "FLOAT", "W8A8", "FAQuant"
W8A8_SUFFIXES = ("weight", "input_scale", "input_offset", "deq_scale", "quant_bias", "weight_scale", "weight_offset")
FA_KINDS = ("fa_q", "fa_k", "fa_v")
C8_KINDS = {"kv_k": "k_proj", "kv_v": "v_proj"}  # recipe kind -> the projection the format names
LINEAR_INPUT = re.compile(r"^w8a8\.(.+)\.input_(scale|offset)$")


def attention_prefix(layer: int) -> str:
    return f"model.layers.{layer}.self_attn"


def is_mindie_dir(path: str | Path) -> bool:
    """Whether ``path`` is a MindIE quantized weight directory (it has ``quant_model_description.json``)."""
    return (Path(path) / DESCRIPTION_FILE).is_file()


def w8a8_linears(recipe: Recipe) -> list[str]:
    """The Linears (HF module paths) that ``recipe`` quantizes to W8A8: those with ``w8a8.<p>.input_scale``
    tensors, less the recipe's ``float_linears`` (kept in float by the layer fallback)."""
    floats = _w8a8_doc(recipe).get("float_linears", {})
    return sorted({m.group(1) for k in recipe.tensors if (m := LINEAR_INPUT.match(k))} - set(floats))


def smoothing_groups(recipe: Recipe) -> list[dict]:
    """The recipe's ``w8a8.smooth`` groups (for :func:`qpass.smoothing.apply_smoothing`), or none."""
    return _w8a8_doc(recipe).get("smooth", [])


def _w8a8_doc(recipe: Recipe) -> dict:
    return getattr(recipe, "w8a8", None) or {}  # the recipe's W8A8 JSON object; {} without W8A8


# ---------------------------------------------------------------------------------------------- export


def export_mindie(config_json: dict, state_dict: dict[str, torch.Tensor], recipe: Recipe, tokenizer,
                  out_dir: str | Path, dtype: torch.dtype) -> Path:
    """Write the MindIE directory for a model into ``out_dir`` (created if needed; existing files replaced).

    ``config_json``: the model's ``config.json`` as a dict. ``state_dict``: HF parameter names, float, with the
    recipe's smoothing already folded in (:func:`qpass.smoothing.apply_smoothing`). ``recipe``: W8A8 input
    qparams (``w8a8.<p>.input_scale/.input_offset``) and, as its config asks, FAQuant / C8 tensors.
    ``dtype``: the model dtype, ``torch.float16`` or ``torch.bfloat16``.
    """
    name = next((k for k, v in MODEL_DTYPES.items() if v == dtype), None)
    if name is None:
        raise QpassError(f"--dtype {dtype}: the MindIE format stores float16 or bfloat16 models; choose one of those")
    fa, c8 = recipe.config.fa_quant, recipe.config.kv_cache == "int8"
    if c8 and dtype == torch.bfloat16:
        raise QpassError("--dtype bfloat16 with --kv-int8: MindIE's C8 (int8 KV cache) is documented for float16 weights "
                         "only; use --dtype float16, or drop --kv-int8 (FAQuant keeps the cache int8 in bfloat16 too)")
    linears = w8a8_linears(recipe)
    if not linears:
        raise QpassError("--format mindie: the recipe has no W8A8 Linears (no w8a8.<linear>.input_scale tensors); "
                         "compile with --w8a8, or write the qpass format instead")
    tied = bool(config_json.get("tie_word_embeddings")) and "model.embed_tokens.weight" in state_dict
    if tied and "lm_head" in linears:
        raise QpassError("recipe quantizes lm_head, but this model ties lm_head to embed_tokens; keep lm_head in float")
    tensors, types = {}, {}
    for p in linears:
        if f"{p}.weight" not in state_dict:
            raise QpassError(f"recipe names W8A8 Linear {p}, but the model has no {p}.weight; use a recipe calibrated for this model")
        for suffix, tensor in w8a8_tensors(state_dict[f"{p}.weight"], state_dict.get(f"{p}.bias"),
                                           recipe.tensors[f"w8a8.{p}.input_scale"],
                                           recipe.tensors[f"w8a8.{p}.input_offset"], dtype).items():
            tensors[f"{p}.{suffix}"], types[f"{p}.{suffix}"] = tensor, W8A8
    quantized = {f"{p}.{s}" for p in linears for s in ("weight", "bias")}
    for key, value in state_dict.items():
        if key in quantized or (tied and key == "lm_head.weight"):
            continue  # a tied lm_head is embed_tokens: loaders tie it again from config.json
        if not value.is_floating_point():
            raise QpassError(f"state_dict tensor {key} is {value.dtype}, not float; give the float model's state dict")
        tensors[key], types[key] = value.detach().to(dtype), FLOAT
    for site in recipe.sites:
        a = attention_prefix(site.layer)
        if fa:
            for kind in FA_KINDS:
                scale, offset = recipe.get(site.layer, kind)
                tensors[f"{a}.{kind}.scale"], tensors[f"{a}.{kind}.offset"] = scale.to(dtype), offset.to(dtype)
                types[f"{a}.{kind}.scale"] = types[f"{a}.{kind}.offset"] = FAQUANT
        if c8:
            for kind, proj in C8_KINDS.items():
                scale, offset = recipe.get(site.layer, kind)
                tensors[f"{a}.{proj}.kv_cache_scale"], tensors[f"{a}.{proj}.kv_cache_offset"] = scale.to(dtype), offset.to(dtype)
                types[f"{a}.{proj}.kv_cache_scale"] = types[f"{a}.{proj}.kv_cache_offset"] = W8A8
    description = {"model_quant_type": W8A8}
    if fa:
        description["fa_quant_type"] = FAQUANT
    if c8:
        description["kv_cache_type"] = description["kv_quant_type"] = "C8"
    description.update(sorted(types.items()))
    config = dict(config_json)
    config["torch_dtype"] = name
    if "dtype" in config:  # transformers 5 writes `dtype`; keep the two from disagreeing
        config["dtype"] = name
    config["quantization_config"] = {k: v for k, v in (("fa_quant_type", FAQUANT if fa else None),
                                                       ("kv_quant_type", "C8" if c8 else None)) if v}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # one metadata key: safetensors writes a multi-key metadata map in no fixed order
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    _write_json(out / DESCRIPTION_FILE, description, sort_keys=False)
    _write_json(out / CONFIG_FILE, config, sort_keys=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
        _write_json(out / CONFIG_FILE, config, sort_keys=True)  # some tokenizers write a config.json of their own
    return out


def w8a8_tensors(weight: torch.Tensor, bias: torch.Tensor | None, input_scale: torch.Tensor, input_offset: torch.Tensor,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The format's tensors of one W8A8 Linear (suffix -> tensor), for model dtype ``dtype``.

    ``input_scale`` is rounded to ``dtype`` first and ``deq_scale`` computed from the rounded value, so that
    ``xq = round(x / input_scale + input_offset)`` and ``deq_scale`` agree exactly as a runtime reads them.
    """
    scale = input_scale.reshape(-1)[:1].to(dtype).float()
    offset = torch.round(input_offset.reshape(-1)[:1].float())
    if not (torch.isfinite(scale).all() and scale.item() > 0):
        raise QpassError(f"W8A8 input_scale {input_scale.tolist()} becomes {scale.item()} in {dtype}; "
                         "recalibrate (the activation range is empty or out of the model dtype's range)")
    w = w8a8_weights(weight, bias, scale.item(), offset.item())
    n = w.weight.shape[0]
    deq = w.deq_scale.view(torch.int32).to(torch.int64) if dtype == torch.float16 else w.deq_scale.clone()
    return {"weight": w.weight, "input_scale": scale.to(dtype), "input_offset": offset.to(dtype), "deq_scale": deq,
            "quant_bias": w.quant_bias, "weight_scale": w.weight_scale.reshape(n, 1).float(),
            "weight_offset": torch.zeros(n, 1, dtype=torch.float32)}


def _write_json(path: Path, doc: dict, sort_keys: bool) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=sort_keys) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------ load


@dataclass
class MindIEModel:
    """A loaded MindIE directory: the HF model (W8A8 Linears replaced), tokenizer, and FAQuant/C8 recipe.

    ``recipe`` is None when the directory quantizes neither attention (FAQuant) nor the KV cache (C8).
    """

    model: torch.nn.Module
    tokenizer: object
    recipe: Recipe | None
    model_dtype: torch.dtype  # what the directory stores (float16 / bfloat16); the model computes in float32
    w8a8: list[str]           # the Linears that run in integer arithmetic


def load_mindie(directory: str | Path, compute_dtype: torch.dtype = torch.float32, load_tokenizer: bool = True) -> MindIEModel:
    """Validate a MindIE directory and build the model it describes (see the module docstring).

    A missing file or tensor, a wrong dtype or shape, or a description that disagrees with the weights raises
    :class:`QpassError` naming the tensor.
    """
    d = Path(directory)
    for f in (CONFIG_FILE, WEIGHTS_FILE, DESCRIPTION_FILE):
        if not (d / f).is_file():
            raise QpassError(f"{d}: no {f}; a MindIE directory needs {CONFIG_FILE}, {WEIGHTS_FILE} and {DESCRIPTION_FILE}")
    config_json = _read_json(d, CONFIG_FILE)
    description = _read_json(d, DESCRIPTION_FILE)
    model_dtype = _model_dtype(d, config_json)
    fa, c8 = _quant_kinds(d, config_json, description)
    try:
        with safe_open(str(d / WEIGHTS_FILE), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise QpassError(f"{d}: cannot read {WEIGHTS_FILE} ({err}); re-export the directory") from err
    types = {k: v for k, v in description.items() if k not in ("model_quant_type", "fa_quant_type", "kv_cache_type", "kv_quant_type")}
    check = _Checker(d, tensors, types, model_dtype)
    for name in sorted(types):
        if name not in tensors:
            raise QpassError(f"{d}: {DESCRIPTION_FILE} lists {name} ({types[name]}), but {WEIGHTS_FILE} has no such tensor; "
                             "add the tensor or re-export the directory")
        if types[name] not in (FLOAT, W8A8, FAQUANT):
            raise QpassError(f"{d}: {DESCRIPTION_FILE} types {name} as {types[name]!r}; use FLOAT, W8A8 or FAQuant")
    for name in sorted(tensors):
        if name not in types:
            raise QpassError(f"{d}: tensor {name} has no entry in {DESCRIPTION_FILE}; type every tensor FLOAT, W8A8 or FAQuant")

    from transformers import AutoConfig, AutoModelForCausalLM

    hf_json = {k: v for k, v in config_json.items() if k not in ("quantization_config", "torch_dtype", "dtype")}
    model_type = hf_json.pop("model_type", None)
    try:
        config = AutoConfig.for_model(model_type, **hf_json)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=compute_dtype)
    except (ValueError, KeyError, TypeError) as err:
        raise QpassError(f"{d}: cannot build a model from {CONFIG_FILE} (model_type {model_type!r}: {err}); "
                         "it must be a Hugging Face causal-LM config") from err
    model.eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    w8a8 = sorted(n.removesuffix(".weight") for n, t in types.items() if t == W8A8 and n.endswith(".weight"))
    for p in w8a8:
        if p not in linears:
            raise QpassError(f"{d}: {p}.weight is typed W8A8, but {p} is not a Linear of this {model_type} model; "
                             "type it FLOAT or fix the name")
        module = linears[p]
        replacement = W8A8Linear(check.w8a8(p, module.out_features, module.in_features))
        parent, _, child = p.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, replacement)
    extra = {f"{p}.{s}" for p in w8a8 for s in W8A8_SUFFIXES}
    bias = next((f"{p}.bias" for p in w8a8 if f"{p}.bias" in tensors), None)
    if bias is not None:
        raise QpassError(f"{d}: tensor {bias} is the float bias of a W8A8 Linear; the format folds the bias into "
                         "quant_bias, so remove the tensor (or re-export)")
    floats = {}
    expected = model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    for key, param in expected.items():
        if key.rpartition(".")[0] in w8a8:  # W8A8Linear buffers, filled from the format's tensors above
            continue
        if tied and key == "lm_head.weight" and key not in tensors:
            continue  # tied to model.embed_tokens.weight, as config.json says
        floats[key] = check.float_tensor(key, tuple(param.shape)).to(compute_dtype)
    model.load_state_dict(floats, strict=False)
    if tied:
        model.tie_weights()
    recipe, attention = _recipe(config, check, fa, c8)
    unknown = sorted(set(tensors) - extra - set(floats) - attention - ({"lm_head.weight"} if tied else set()))
    if unknown:
        raise QpassError(f"{d}: tensor {unknown[0]} is not a parameter of this {model_type} model nor a tensor the format "
                         f"defines ({len(unknown)} such); remove it or fix its name")
    tokenizer = None
    if load_tokenizer:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(d))
        except (OSError, ValueError) as err:
            raise QpassError(f"{d}: cannot load the tokenizer files ({err}); add tokenizer.json / tokenizer_config.json") from err
    return MindIEModel(model, tokenizer, recipe, model_dtype, w8a8)


def _read_json(d: Path, name: str) -> dict:
    try:
        doc = json.loads((d / name).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise QpassError(f"{d}: {name} is not valid JSON ({err}); repair it or re-export the directory") from err
    if not isinstance(doc, dict):
        raise QpassError(f"{d}: {name} is not a JSON object; repair it or re-export the directory")
    return doc


def _model_dtype(d: Path, config_json: dict) -> torch.dtype:
    name = config_json.get("torch_dtype", config_json.get("dtype"))
    if name not in MODEL_DTYPES:
        raise QpassError(f"{d}: {CONFIG_FILE} torch_dtype is {name!r}; a MindIE directory stores float16 or bfloat16 models")
    return MODEL_DTYPES[name]


def _quant_kinds(d: Path, config_json: dict, description: dict) -> tuple[bool, bool]:
    """(FAQuant, C8) from the description's model-level keys, checked against config.json."""
    if description.get("model_quant_type") != W8A8:
        raise QpassError(f"{d}: {DESCRIPTION_FILE} model_quant_type is {description.get('model_quant_type')!r}; "
                         "qpass loads W8A8 directories (\"model_quant_type\": \"W8A8\")")
    fa = description.get("fa_quant_type")
    if fa not in (None, FAQUANT):
        raise QpassError(f"{d}: {DESCRIPTION_FILE} fa_quant_type is {fa!r}; only \"FAQuant\" is defined")
    kv = (description.get("kv_cache_type"), description.get("kv_quant_type"))
    if kv not in ((None, None), ("C8", "C8")):
        raise QpassError(f"{d}: {DESCRIPTION_FILE} has kv_cache_type {kv[0]!r} and kv_quant_type {kv[1]!r}; "
                         "C8 needs both set to \"C8\" (or neither, for a float KV cache)")
    qc = config_json.get("quantization_config") or {}
    if qc.get("fa_quant_type") != fa or qc.get("kv_quant_type") != kv[1]:
        raise QpassError(f"{d}: {CONFIG_FILE} quantization_config {qc} disagrees with {DESCRIPTION_FILE} "
                         f"(fa_quant_type {fa!r}, kv_quant_type {kv[1]!r}); make them agree")
    return fa == FAQUANT, kv[1] == "C8"


class _Checker:
    """Reads tensors out of the file, checking each one's description type, dtype and shape."""

    def __init__(self, d: Path, tensors: dict, types: dict, model_dtype: torch.dtype):
        self.d, self.tensors, self.types, self.model_dtype = d, tensors, types, model_dtype

    def get(self, name: str, kind: str, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...], what: str) -> torch.Tensor:
        if name not in self.tensors:
            raise QpassError(f"{self.d}: missing tensor {name} ({what}, {_dt(dtypes)} {list(shape)}); add it or re-export the directory")
        t = self.tensors[name]
        if self.types.get(name) != kind:
            raise QpassError(f"{self.d}: {DESCRIPTION_FILE} types {name} as {self.types.get(name)!r} but it is {what}; "
                             f"type it {kind!r}")
        if t.dtype not in dtypes:
            raise QpassError(f"{self.d}: tensor {name} is {_dt((t.dtype,))}, expected {_dt(dtypes)} ({what}); re-export it in that dtype")
        if tuple(t.shape) != shape:
            raise QpassError(f"{self.d}: tensor {name} has shape {list(t.shape)}, expected {list(shape)} ({what}); "
                             "it does not fit this model's config.json")
        return t

    def float_tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self.get(name, FLOAT, (self.model_dtype,), shape, "a float parameter")

    def scale(self, name: str, kind: str, shape: tuple[int, ...], what: str) -> torch.Tensor:
        t = self.get(name, kind, (self.model_dtype,), shape, what).float()
        if not (torch.isfinite(t).all() and (t > 0).all()):
            raise QpassError(f"{self.d}: tensor {name} ({what}) has a value that is not a positive finite number; recalibrate")
        return t

    def w8a8(self, p: str, n: int, k: int) -> W8A8Weights:
        floats = (torch.float32, torch.float16, torch.bfloat16)
        weight = self.get(f"{p}.weight", W8A8, (torch.int8,), (n, k), "a W8A8 int8 weight")
        in_scale = self.scale(f"{p}.input_scale", W8A8, (1,), "a W8A8 input_scale")
        in_offset = self.get(f"{p}.input_offset", W8A8, (self.model_dtype,), (1,), "a W8A8 input_offset").float()
        if self.model_dtype == torch.float16:
            raw = self.get(f"{p}.deq_scale", W8A8, (torch.int64,), (n,), "a W8A8 deq_scale: float32 bits as int32, widened to int64")
            if raw.min() < -(2**31) or raw.max() >= 2**31:
                raise QpassError(f"{self.d}: tensor {p}.deq_scale has values outside int32; store the float32 bits of "
                                 "input_scale * weight_scale reinterpreted as int32, widened to int64")
            deq = raw.to(torch.int32).view(torch.float32)
        else:
            deq = self.get(f"{p}.deq_scale", W8A8, (torch.float32,), (n,), "a W8A8 deq_scale (float32 for bfloat16 models)")
        quant_bias = self.get(f"{p}.quant_bias", W8A8, (torch.int32,), (n,), "a W8A8 quant_bias")
        w_scale = self.get(f"{p}.weight_scale", W8A8, floats, (n, 1), "a W8A8 weight_scale").float().reshape(n)
        self.get(f"{p}.weight_offset", W8A8, floats, (n, 1), "a W8A8 weight_offset")
        expected = in_scale * w_scale
        if not torch.isfinite(deq).all() or not torch.allclose(deq, expected, rtol=1e-2, atol=0.0):
            i = int(((deq - expected).abs() / expected.abs().clamp(min=1e-30)).nan_to_num(float("inf")).argmax())
            raise QpassError(f"{self.d}: tensor {p}.deq_scale[{i}] is {deq[i].item():.6g}, but input_scale * weight_scale is "
                             f"{expected[i].item():.6g}; store input_scale * weight_scale (float16 models: its float32 bits as int64)")
        return W8A8Weights(weight, w_scale, in_scale, in_offset, deq.clone(), quant_bias)


def _recipe(config, check: _Checker, fa: bool, c8: bool) -> tuple[Recipe | None, set[str]]:
    """The qpass recipe of the FAQuant / C8 tensors (float32, offsets unchanged) and the tensor names it used."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    used, tensors = set(), {}
    for i in range(layers):
        a = attention_prefix(i)
        if fa:
            for kind, h in (("fa_q", heads), ("fa_k", kv_heads), ("fa_v", kv_heads)):
                for part in ("scale", "offset"):
                    name = f"{a}.{kind}.{part}"
                    what = f"FAQuant {kind} {part}"
                    t = check.scale(name, FAQUANT, (h, head_dim), what) if part == "scale" else \
                        check.get(name, FAQUANT, (check.model_dtype,), (h, head_dim), what).float()
                    tensors[f"layers.{i}.{kind}.{part}"] = t
                    used.add(name)
        if c8:
            for kind, proj in C8_KINDS.items():
                for part in ("scale", "offset"):
                    name = f"{a}.{proj}.kv_cache_{part}"
                    what = f"C8 {proj} kv_cache_{part}"
                    t = check.scale(name, W8A8, (kv_heads * head_dim,), what) if part == "scale" else \
                        check.get(name, W8A8, (check.model_dtype,), (kv_heads * head_dim,), what).float()
                    tensors[f"layers.{i}.{kind}.{part}"] = t
                    used.add(name)
    if not (fa or c8):
        return None, used
    sites = [SiteGeometry(i, heads, kv_heads, head_dim) for i in range(layers)]
    return Recipe(QuantConfig(fa_quant=fa, kv_cache="int8" if c8 else None), sites, tensors), used


def _dt(dtypes) -> str:
    return " or ".join(str(t).removeprefix("torch.") for t in dtypes)


# ------------------------------------------------------------------------------------------- eval / run

DEFAULT_WINDOW = 512
DEFAULT_BATCH = 4


def quantized_program(loaded: MindIEModel, window: int, verify: bool = True):
    """The loaded model captured over ``[batch, window]`` token ids, with FAQuant / C8 Q/DQ from its recipe.

    W8A8 Linears stay ``qpass::w8a8_linear`` ops in the graph (integer arithmetic); without a recipe the
    captured program is returned as it is.
    """
    from qpass.api import param_names
    from qpass.calibrate import geometry
    from qpass.capture import capture
    from qpass.passes.find_attention_sites import find_attention_sites
    from qpass.pipeline import quantize_program

    program = capture(loaded.model, window)
    if loaded.recipe is None:
        return program
    sites = find_attention_sites(program.graph, param_names(program))
    loaded.recipe.check_matches(geometry(sites))
    quantized, _ = quantize_program(program, sites, loaded.recipe, verify=verify)
    return quantized


def evaluate_mindie(directory: str | Path, eval: str | Path, eval_windows: int, window: int = DEFAULT_WINDOW,
                    batch_size: int = DEFAULT_BATCH) -> dict:
    """Perplexity of a MindIE directory on the text file ``eval``: integer W8A8 Linears, FAQuant / C8 Q/DQ."""
    import time

    from qpass.data import read_text, token_windows
    from qpass.evaluate import perplexity

    start = time.perf_counter()
    loaded = load_mindie(directory)
    window = min(window, getattr(loaded.model.config, "max_position_embeddings", None) or window)
    ids = token_windows(loaded.tokenizer, [read_text(eval, "--eval")], window, eval_windows, "--eval")
    program = quantized_program(loaded, window)
    loaded_s = time.perf_counter() - start
    start = time.perf_counter()
    ppl = perplexity(program.module(), ids, batch_size, "eval quantized")
    return {"file": str(eval), "format": "mindie", "model_dtype": str(loaded.model_dtype).removeprefix("torch."),
            "w8a8_linears": len(loaded.w8a8), "fa_quant": bool(loaded.recipe and loaded.recipe.config.fa_quant),
            "kv_cache": loaded.recipe.config.kv_cache if loaded.recipe else None,
            "tokens": int(ids.numel()), "windows": int(ids.shape[0]), "window": window, "ppl_quant": ppl,
            "timings_s": {"load": round(loaded_s, 3), "eval": round(time.perf_counter() - start, 3)}}


def generate_mindie(loaded: MindIEModel, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding. With FAQuant / C8: the lowered decoder on the paged int8 KV cache (:mod:`qpass.generate`);
    W8A8 alone keeps the KV cache in float, as the format says, and decodes with the model's own cache."""
    from qpass.generate import build_decoder, generate_lowered

    eos = loaded.tokenizer.eos_token_id if loaded.tokenizer is not None else None
    if loaded.recipe is not None:
        _, lowered = build_decoder(loaded.model, loaded.recipe)
        return generate_lowered(lowered, prompt_ids, max_new_tokens, eos_token_id=eos)
    if not prompt_ids:
        raise QpassError("the prompt is empty; give at least one token")
    ids = torch.tensor([list(prompt_ids)])
    with torch.no_grad():
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                    do_sample=False, eos_token_id=eos, pad_token_id=eos)
    return out[0, ids.shape[1]:].tolist()
