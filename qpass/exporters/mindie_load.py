"""Read a MindIE / msModelSlim quantized weight directory (:mod:`qpass.exporters.mindie_format`) back into a model.

Both consumers' forms are read, and msModelSlim's older and current savers': ``quantization_config`` in
``config.json`` or none; ``weight_scale`` / ``weight_offset`` or not; C8 tensors typed ``W8A8`` or ``C8``;
a W8A8 Linear's float ``.bias`` beside its ``quant_bias``; W8A8_DYNAMIC Linears (per-token activations,
``weight`` / ``weight_scale`` / ``weight_offset``, read as :class:`qpass.runtime.w8a8.W8A8DynamicLinear`); FAQuant
scales ``[heads, head_dim]`` or one per head ``[heads, 1]``; scales in the model dtype or float32.

Each Linear is read by its own weight's type, as vllm-ascend and MindIE-LLM's runtime choose its method: a W8A8
directory (``"model_quant_type": "W8A8"``) may hold W8A8_DYNAMIC Linears beside W8A8 ones (static W8A8 with
per-token Linears, :mod:`qpass.exporters.mindie_write`), each checked against the tensors of its type and built in
its own form. Linears that both consumers fuse into one layer (q/k/v, gate/up) must then share a type.

Every tensor's name, description type, dtype and shape is checked against the description and the
config; the model is a Hugging Face causal LM whose W8A8 Linears are replaced by
:class:`qpass.runtime.w8a8.W8A8Linear` (W8A8_DYNAMIC: :class:`qpass.runtime.w8a8.W8A8DynamicLinear`), and FAQuant /
C8 come back as a :class:`Recipe` that the frontend applies. Remote code is never run.
"""

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from qpass.core.config import QuantConfig
from qpass.core.errors import QpassError
from qpass.core.naming import LM_HEAD, fused_siblings
from qpass.core.recipe import Recipe, SiteGeometry, site_key
from qpass.exporters.base import Loaded
from qpass.exporters.mindie_format import (
    C8,
    C8_PROJECTIONS,
    CONFIG_FILE,
    DESCRIPTION_FILE,
    FA_TYPES,
    FAQUANT,
    FLOAT,
    MODEL_KEYS,
    W8A8,
    W8A8_DYNAMIC,
    W8A8_DYNAMIC_SUFFIXES,
    W8A8_SUFFIXES,
    WEIGHTS_FILE,
    WEIGHTS_INDEX,
)
from qpass.models.loaders import check_remote_code, load_tokenizer
from qpass.runtime.w8a8 import W8A8DynamicLinear, W8A8DynamicWeights, W8A8Linear, W8A8Weights

MODEL_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def load(
    directory: str | Path,
    purpose: str = "eval",
    compute_dtype: torch.dtype = torch.float32,
    load_tokenizer: bool = True,
    build: bool = True,
) -> Loaded:
    """Validate a MindIE directory and build the model it describes (:mod:`qpass.exporters.mindie_format`):
    a Hugging Face model with W8A8 Linears in integer arithmetic, computing in ``compute_dtype``, and the
    recipe of its FAQuant / C8 tensors (None when it has neither). ``purpose`` does not change what is read.

    A missing file or tensor, a wrong dtype or shape, or a description that disagrees with the weights raises
    :class:`QpassError` naming the tensor. Tensors are read from their file (or shard) when they are checked;
    ``build=False`` checks every one the same way, on a model built on the meta device, and keeps none of them
    (:func:`check`: a directory larger than memory is read one tensor at a time).
    """
    d = Path(directory)
    weights = WEIGHTS_INDEX if not (d / WEIGHTS_FILE).is_file() and (d / WEIGHTS_INDEX).is_file() else WEIGHTS_FILE
    for f in (CONFIG_FILE, weights, DESCRIPTION_FILE):
        if not (d / f).is_file():
            raise QpassError(
                f"{d}: no {f}; a MindIE directory needs {CONFIG_FILE}, {WEIGHTS_FILE} (or {WEIGHTS_INDEX} and its "
                f"shards) and {DESCRIPTION_FILE}"
            )
    config_json = _read_json(d, CONFIG_FILE)
    description = _read_json(d, DESCRIPTION_FILE)
    model_dtype = _model_dtype(d, config_json)
    fa, c8 = _quant_kinds(d, config_json, description)
    tensors = _read_weights(d, weights)
    # msModelSlim also writes per-module metadata strings (``<a>.quant_type``) that name no tensor
    types = {k: v for k, v in description.items() if k not in MODEL_KEYS and not k.endswith(".quant_type")}
    tied = bool(config_json.get("tie_word_embeddings"))
    if tied and types.get(LM_HEAD) == FLOAT and LM_HEAD not in tensors:
        del types[LM_HEAD]  # vllm-ascend asks for the LM head's type even when it is the embedding
    _check_types(d, tensors, types)
    check = _Checker(d, tensors, types, model_dtype)
    config, model = build_model(d, config_json, compute_dtype, build)
    model_type = config.model_type
    w8a8, extra = _w8a8_linears(d, model, types, check, build)
    floats, checked = {}, set()  # checked: the float tensors read (and kept in floats when building)
    expected = model.state_dict()
    for key, param in expected.items():
        if key.rpartition(".")[0] in w8a8:  # W8A8Linear buffers, filled from the format's tensors above
            continue
        if tied and key == LM_HEAD and key not in tensors:
            continue  # tied to model.embed_tokens.weight, as config.json says
        value = check.float_tensor(key, tuple(param.shape))
        checked.add(key)
        if build:
            floats[key] = value.to(compute_dtype)
        del value
    if build:
        model.load_state_dict(floats, strict=False)
        if tied:
            model.tie_weights()
    recipe, attention = _recipe(config, check, fa, c8)
    unknown = sorted(set(tensors) - extra - checked - attention - ({LM_HEAD} if tied else set()))
    if unknown:
        raise QpassError(
            f"{d}: tensor {unknown[0]} is not a parameter of this {model_type} model nor a tensor the format "
            f"defines ({len(unknown)} such); remove it or fix its name"
        )
    tokenizer = _tokenizer(d) if load_tokenizer else None
    info = {
        "format": "mindie",
        "model_dtype": str(model_dtype).removeprefix("torch."),
        "w8a8_linears": len(w8a8),
        "fa_quant": fa,
        "kv_cache": "static" if c8 else None,
    }
    return Loaded("mindie", tokenizer, recipe, model=model if build else None, info=info)


def _w8a8_linears(d: Path, model: torch.nn.Module, types: dict[str, str], check, build: bool):
    """``(the W8A8 Linears' module paths, the format's tensors they read)``: each one's tensors checked and, when
    ``build``, the Linear replaced by a :class:`W8A8Linear` of them."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    kinds = {
        n.removesuffix(".weight"): t for n, t in types.items() if t in (W8A8, W8A8_DYNAMIC) and n.endswith(".weight")
    }
    w8a8 = sorted(kinds)
    for p in w8a8:
        if p not in linears:
            raise QpassError(
                f"{d}: {p}.weight is typed {kinds[p]}, but {p} is not a Linear of this {model.config.model_type} "
                "model; type it FLOAT or fix the name"
            )
        mixed = {s: kinds[s] for s in fused_siblings(p) if s in kinds and kinds[s] != kinds[p]}
        if mixed:  # vllm-ascend and MindIE fuse them into one layer of one quant type, and refuse this
            other = next(iter(mixed))
            raise QpassError(
                f"{d}: {DESCRIPTION_FILE} types {p}.weight {kinds[p]} but {other}.weight {mixed[other]}, which "
                "vllm-ascend and MindIE fuse into one layer of one quant type; type the fused Linears alike "
                "(re-export from a recipe that keeps each fused group together)"
            )
        module = linears[p]
        if kinds[p] == W8A8_DYNAMIC:
            weights = check.w8a8_dynamic(p, module.out_features, module.in_features, module.bias is not None)
            made = W8A8DynamicLinear(weights) if build else None
        else:
            weights = check.w8a8(p, module.out_features, module.in_features)
            made = W8A8Linear(weights) if build else None
        if build:
            parent, _, child = p.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, made)
        del weights, made
    tensors = check.tensors
    suffixes = {W8A8: W8A8_SUFFIXES, W8A8_DYNAMIC: W8A8_DYNAMIC_SUFFIXES}
    extra = {f"{p}.{s}" for p in w8a8 for s in suffixes[kinds[p]] if f"{p}.{s}" in tensors}
    for p in w8a8:  # msModelSlim keeps a W8A8 Linear's float bias too (FLOAT); quant_bias already holds it
        if kinds[p] == W8A8_DYNAMIC:  # its float bias was read above, into the Linear
            extra |= {f"{p}.bias"} & set(tensors)
            continue
        if f"{p}.bias" in tensors:
            check.get(
                f"{p}.bias", (FLOAT,), FLOAT_DTYPES, (linears[p].out_features,), "the float bias of a W8A8 Linear"
            )
            extra.add(f"{p}.bias")
    return w8a8, extra


def _check_types(d: Path, tensors, types: dict[str, str]) -> None:
    """Every tensor typed in the description, every typed name a tensor, every type one the format defines."""
    for name in sorted(types):
        if name not in tensors:
            raise QpassError(
                f"{d}: {DESCRIPTION_FILE} lists {name} ({types[name]}), but {WEIGHTS_FILE} has no such "
                "tensor; add the tensor or re-export the directory"
            )
        if types[name] not in (FLOAT, W8A8, W8A8_DYNAMIC, FAQUANT, C8):
            raise QpassError(
                f"{d}: {DESCRIPTION_FILE} types {name} as {types[name]!r}; use FLOAT, W8A8, W8A8_DYNAMIC, C8 or FAQuant"
            )
    for name in sorted(tensors):
        if name not in types:
            raise QpassError(
                f"{d}: tensor {name} has no entry in {DESCRIPTION_FILE}; type every tensor FLOAT, W8A8 or FAQuant"
            )


def build_model(d: Path, config_json: dict, compute_dtype: torch.dtype, build: bool):
    """``(config, model)``: the Hugging Face causal LM ``config.json`` describes, of a built-in architecture only, in
    ``compute_dtype`` (on the meta device unless ``build``), in eval mode."""
    from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM

    hf_json = {k: v for k, v in config_json.items() if k not in ("quantization_config", "torch_dtype", "dtype")}
    model_type = hf_json.pop("model_type", None)
    check_remote_code(str(d), config_json)  # the built-in architecture, with a warning, or refused
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise QpassError(
            f"{d}: {CONFIG_FILE} model_type {model_type!r} is not an architecture transformers has built "
            "in; give the directory of a causal LM of a built-in architecture (llama, qwen2, ...)"
        )
    try:
        config = AutoConfig.for_model(model_type, **hf_json)
        with torch.device("cpu" if build else "meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=compute_dtype)
    except Exception as err:  # transformers validates configs with many error types of its own
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise QpassError(
            f"{d}: cannot build a model from {CONFIG_FILE} (model_type {model_type!r}: {first}); "
            "it must be a Hugging Face causal-LM config"
        ) from None
    return config, model.eval()


def _tokenizer(d: Path):
    return load_tokenizer(d, str(d), "add tokenizer.json / tokenizer_config.json")


def _read_weights(d: Path, weights: str) -> "_Tensors":
    """Every tensor of the weights file, or of the shards the index maps them to (each tensor in its mapped shard),
    read when it is looked up; the names are checked against each file's header now."""
    if weights == WEIGHTS_FILE:
        return _Tensors(d, {name: WEIGHTS_FILE for name in _stored_names(d, WEIGHTS_FILE)})
    weight_map = _read_json(d, WEIGHTS_INDEX).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise QpassError(
            f"{d}: {WEIGHTS_INDEX} has no weight_map of tensor names to shard files; re-export the directory"
        )
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(shard, []).append(name)
    for shard, names in shards.items():
        if Path(shard).name != shard or not (d / shard).is_file():
            raise QpassError(
                f"{d}: {WEIGHTS_INDEX} maps tensors to {shard}, which is not a file in the directory; "
                "re-export the directory"
            )
        missing = sorted(set(names) - _stored_names(d, shard))
        if missing:
            raise QpassError(
                f"{d}: {WEIGHTS_INDEX} maps {missing[0]} to {shard}, which has no such tensor; re-export the directory"
            )
    return _Tensors(d, dict(weight_map))


def _stored_names(d: Path, file: str) -> set[str]:
    """The tensor names in ``file``'s header."""
    try:
        with safe_open(str(d / file), framework="pt") as f:
            return set(f.keys())
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise QpassError(f"{d}: cannot read {file} ({err}); re-export the directory") from err


class _Tensors(Mapping):
    """Tensor name -> tensor, read from its file when looked up (the last file kept open: reads go in order)."""

    def __init__(self, d: Path, files: dict[str, str]):
        self.d, self.files, self._open = d, files, (None, None)

    def __getitem__(self, name: str) -> torch.Tensor:
        file = self.files[name]
        try:
            if self._open[0] != file:
                self._open = file, safe_open(str(self.d / file), framework="pt")
            return self._open[1].get_tensor(name)
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise QpassError(f"{self.d}: cannot read {name} from {file} ({err}); re-export the directory") from err

    def __contains__(self, name) -> bool:  # Mapping's would read the tensor
        return name in self.files

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def check(directory: Path) -> None:
    """Re-read a directory just written: every tensor's name, type, dtype and shape, every scale and offset, and
    the tokenizer when one was written; one tensor at a time, no model built (the layer-wise writer's directories
    may be larger than memory)."""
    load(directory, load_tokenizer=(Path(directory) / "tokenizer_config.json").is_file(), build=False)


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
    if not isinstance(name, str) or name not in MODEL_DTYPES:
        raise QpassError(
            f"{d}: {CONFIG_FILE} torch_dtype is {name!r}; a MindIE directory stores float16 or bfloat16 models"
        )
    return MODEL_DTYPES[name]


def _quant_kinds(d: Path, config_json: dict, description: dict) -> tuple[bool, bool]:
    """(FAQuant, C8) from the description's model-level keys, checked against config.json."""
    if description.get("model_quant_type") not in (W8A8, W8A8_DYNAMIC):
        raise QpassError(
            f"{d}: {DESCRIPTION_FILE} model_quant_type is {description.get('model_quant_type')!r}; "
            f'qpass loads W8A8 directories ("model_quant_type": "{W8A8}" or "{W8A8_DYNAMIC}")'
        )
    fa = description.get("fa_quant_type")
    if fa not in (None, *FA_TYPES):
        raise QpassError(f"{d}: {DESCRIPTION_FILE} fa_quant_type is {fa!r}; qpass reads {' or '.join(FA_TYPES)}")
    kv = (description.get("kv_cache_type"), description.get("kv_quant_type"))
    if kv not in ((None, None), (C8, C8), (C8, None)):
        raise QpassError(
            f"{d}: {DESCRIPTION_FILE} has kv_cache_type {kv[0]!r} and kv_quant_type {kv[1]!r}; "
            'C8 needs kv_cache_type "C8" (and kv_quant_type "C8" or none), a float KV cache neither'
        )
    # msModelSlim's current saver deletes quantization_config; MindIE's documented form has one, which must agree
    qc = config_json.get("quantization_config")
    if qc is not None and (
        not isinstance(qc, dict) or qc.get("fa_quant_type") != fa or qc.get("kv_quant_type") != kv[1]
    ):
        raise QpassError(
            f"{d}: {CONFIG_FILE} quantization_config {qc} disagrees with {DESCRIPTION_FILE} "
            f"(fa_quant_type {fa!r}, kv_quant_type {kv[1]!r}); make them agree, or remove it"
        )
    return fa is not None, kv[0] == C8


class _Checker:
    """Reads tensors out of the file, checking each one's description type, dtype and shape."""

    def __init__(self, d: Path, tensors: dict, types: dict, model_dtype: torch.dtype):
        self.d, self.tensors, self.types, self.model_dtype = d, tensors, types, model_dtype

    def get(self, name: str, kinds: tuple[str, ...], dtypes: tuple[torch.dtype, ...], shape, what: str) -> torch.Tensor:
        """The tensor ``name``, typed one of ``kinds``, of one of ``dtypes``, shaped ``shape`` (or one of the shapes
        in a list)."""
        if name not in self.tensors:
            raise QpassError(
                f"{self.d}: missing tensor {name} ({what}, {_dt(dtypes)} {list(shape)}); "
                "add it or re-export the directory"
            )
        t = self.tensors[name]
        if self.types.get(name) not in kinds:
            raise QpassError(
                f"{self.d}: {DESCRIPTION_FILE} types {name} as {self.types.get(name)!r} but it is {what}; "
                f"type it {kinds[0]!r}"
            )
        if t.dtype == torch.int8 and kinds == (FLOAT,):
            raise QpassError(
                f"{self.d}: tensor {name} is int8, but {DESCRIPTION_FILE} types it {FLOAT!r}; type it {W8A8!r} "
                "(with its scales) or re-export the directory"
            )
        if t.dtype not in dtypes:
            raise QpassError(
                f"{self.d}: tensor {name} is {_dt((t.dtype,))}, expected {_dt(dtypes)} ({what}); "
                "re-export it in that dtype"
            )
        if tuple(t.shape) not in (shape if isinstance(shape, list) else [shape]):
            raise QpassError(
                f"{self.d}: tensor {name} has shape {list(t.shape)}, expected {list(shape)} ({what}); "
                "it does not fit this model's config.json"
            )
        return t

    def float_tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self.get(name, (FLOAT,), (self.model_dtype,), shape, "a float parameter")

    def scale(self, name: str, kinds: tuple[str, ...], shape, what: str) -> torch.Tensor:
        """A scale in the model dtype or float32 (msModelSlim writes float32): positive and finite."""
        t = self.get(name, kinds, (self.model_dtype, torch.float32), shape, what).float()
        if not (torch.isfinite(t).all() and (t > 0).all()):
            raise QpassError(
                f"{self.d}: tensor {name} ({what}) has a value that is not a positive finite number; recalibrate"
            )
        if t.numel() > 1 and bool((t == 1.0).all()):
            raise QpassError(
                f"{self.d}: tensor {name} ({what}) is 1.0 in every channel, the value a calibration that saw no "
                "data leaves; recalibrate, with calibration text that reaches this layer"
            )
        return t

    def offset(
        self, name: str, kinds: tuple[str, ...], dtypes: tuple[torch.dtype, ...], shape, what: str
    ) -> torch.Tensor:
        """An offset (an integer value in any of ``dtypes``) within the int8 range, as float32."""
        t = self.get(name, kinds, dtypes, shape, what).float()
        if not (torch.isfinite(t).all() and ((t >= -128) & (t <= 127)).all()):
            raise QpassError(
                f"{self.d}: tensor {name} ({what}) has a value that is not a finite number in [-128, 127]; "
                "recalibrate (an int8 offset lies within the int8 range)"
            )
        return t

    def w8a8_dynamic(self, p: str, n: int, k: int, has_bias: bool) -> W8A8DynamicWeights:
        """The tensors of W8A8_DYNAMIC Linear ``p``: int8 ``weight [n, k]``, ``weight_scale`` (positive) and
        ``weight_offset`` (0: symmetric) ``[n, 1]``, and its float ``bias [n]`` (typed FLOAT or W8A8_DYNAMIC) when the
        Linear has one."""
        kinds = (W8A8_DYNAMIC,)
        weight = self.get(f"{p}.weight", kinds, (torch.int8,), (n, k), "a W8A8_DYNAMIC int8 weight")
        w_scale = self.get(f"{p}.weight_scale", kinds, FLOAT_DTYPES, (n, 1), "a W8A8_DYNAMIC weight_scale").float()
        if not (torch.isfinite(w_scale).all() and (w_scale > 0).all()):
            raise QpassError(
                f"{self.d}: tensor {p}.weight_scale has a value that is not a positive finite number; re-export it"
            )
        if f"{p}.weight_offset" in self.tensors:
            offset = self.get(f"{p}.weight_offset", kinds, FLOAT_DTYPES, (n, 1), "a W8A8_DYNAMIC weight_offset")
            if bool((offset != 0).any()):
                raise QpassError(
                    f"{self.d}: tensor {p}.weight_offset is not 0; qpass reads symmetric W8A8_DYNAMIC weights "
                    "(offset 0), as msModelSlim writes them"
                )
        bias = torch.zeros(n)
        if has_bias:
            what = "the float bias of a W8A8_DYNAMIC Linear"
            bias = self.get(f"{p}.bias", (FLOAT, W8A8_DYNAMIC), FLOAT_DTYPES, (n,), what).float()
        return W8A8DynamicWeights(weight, w_scale.reshape(n), bias)

    def w8a8(self, p: str, n: int, k: int) -> W8A8Weights:
        """The tensors of W8A8 Linear ``p``; ``weight_scale`` / ``weight_offset`` are optional (msModelSlim's
        current saver omits them: ``deq_scale / input_scale`` is the weight scale)."""
        kinds = (W8A8,)
        weight = self.get(f"{p}.weight", kinds, (torch.int8,), (n, k), "a W8A8 int8 weight")
        in_scale = self.scale(f"{p}.input_scale", kinds, (1,), "a W8A8 input_scale")
        in_offset = self.offset(f"{p}.input_offset", kinds, (*FLOAT_DTYPES, torch.int8), (1,), "a W8A8 input_offset")
        if self.model_dtype == torch.float16:
            raw = self.get(
                f"{p}.deq_scale",
                kinds,
                (torch.int64,),
                (n,),
                "a W8A8 deq_scale: float32 bits as int32, widened to int64",
            )
            if raw.min() < -(2**31) or raw.max() >= 2**31:
                raise QpassError(
                    f"{self.d}: tensor {p}.deq_scale has values outside int32; store the float32 bits of "
                    "input_scale * weight_scale reinterpreted as int32, widened to int64"
                )
            deq = raw.to(torch.int32).view(torch.float32)
        else:
            deq = self.get(
                f"{p}.deq_scale", kinds, (torch.float32,), (n,), "a W8A8 deq_scale (float32 for bfloat16 models)"
            )
        quant_bias = self.get(f"{p}.quant_bias", kinds, (torch.int32,), (n,), "a W8A8 quant_bias")
        if f"{p}.weight_scale" not in self.tensors:
            if not (torch.isfinite(deq).all() and (deq > 0).all()):
                raise QpassError(
                    f"{self.d}: tensor {p}.deq_scale has a value that is not a positive finite number; re-export it"
                )
            return W8A8Weights(weight, (deq / in_scale).float(), in_scale, in_offset, deq.clone(), quant_bias)
        w_scale = self.get(f"{p}.weight_scale", kinds, FLOAT_DTYPES, (n, 1), "a W8A8 weight_scale").float().reshape(n)
        if f"{p}.weight_offset" in self.tensors:
            self.get(f"{p}.weight_offset", kinds, FLOAT_DTYPES, (n, 1), "a W8A8 weight_offset")
        expected = in_scale * w_scale
        if not torch.isfinite(deq).all() or not torch.allclose(deq, expected, rtol=1e-2, atol=0.0):
            i = int(((deq - expected).abs() / expected.abs().clamp(min=1e-30)).nan_to_num(float("inf")).argmax())
            raise QpassError(
                f"{self.d}: tensor {p}.deq_scale[{i}] is {deq[i].item():.6g}, but input_scale * weight_scale is "
                f"{expected[i].item():.6g}; "
                "store input_scale * weight_scale (float16 models: its float32 bits as int64)"
            )
        return W8A8Weights(weight, w_scale, in_scale, in_offset, deq.clone(), quant_bias)


def _recipe(config, check: _Checker, fa: bool, c8: bool) -> tuple[Recipe | None, set[str]]:
    """The qpass recipe of the FAQuant / C8 tensors (float32, offsets unchanged) and the tensor names it used.

    The attention modules are found from the tensor names (``<a>.fa_q.scale``, ``<a>.k_proj.kv_cache_scale``),
    in natural order of their paths; the layer count must be the config's."""
    if not (fa or c8):
        return None, set()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    suffix = ".fa_q.scale" if fa else f".{C8_PROJECTIONS['kv_k']}.kv_cache_scale"
    prefixes = sorted((n.removesuffix(suffix) for n in check.tensors if n.endswith(suffix)), key=natural)
    if len(prefixes) != config.num_hidden_layers:
        raise QpassError(
            f"{check.d}: {len(prefixes)} tensors named *{suffix} for a config of {config.num_hidden_layers} "
            f"layers; each attention needs its {'FAQuant' if fa else 'C8'} tensors"
        )
    used, tensors = set(), {}
    for i, a in enumerate(prefixes):
        if fa:
            for kind, h in (("fa_q", heads), ("fa_k", kv_heads), ("fa_v", kv_heads)):
                for part in ("scale", "offset"):
                    name = f"{a}.{kind}.{part}"
                    what = f"FAQuant {kind} {part}"
                    # per head and dim, or one value per head ([h, 1], as msModelSlim computes it), repeated
                    shapes = [(h, head_dim), (h, 1)]
                    t = (
                        check.scale(name, (FAQUANT,), shapes, what)
                        if part == "scale"
                        else check.offset(name, (FAQUANT,), (*FLOAT_DTYPES, torch.int8), shapes, what)
                    )
                    tensors[site_key(i, kind, part)] = t.expand(h, head_dim).contiguous()
                    used.add(name)
        if c8:
            for kind, proj in C8_PROJECTIONS.items():
                for part in ("scale", "offset"):
                    name = f"{a}.{proj}.kv_cache_{part}"
                    what = f"C8 {proj} kv_cache_{part}"
                    t = (
                        check.scale(name, (W8A8, C8), (kv_heads * head_dim,), what)
                        if part == "scale"
                        else check.offset(name, (W8A8, C8), FLOAT_DTYPES, (kv_heads * head_dim,), what)
                    )
                    tensors[site_key(i, kind, part)] = t
                    used.add(name)
    sites = [
        SiteGeometry(
            i,
            heads,
            kv_heads,
            head_dim,
            a,
            ("", *(f"{a}.{p}" for p in C8_PROJECTIONS.values())) if c8 else ("", "", ""),
        )
        for i, a in enumerate(prefixes)
    ]
    return Recipe(QuantConfig(fa_quant=fa, kv_cache="static" if c8 else None), sites, tensors), used


def natural(path: str) -> list:
    """Sort key: ``model.layers.10`` after ``model.layers.9``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def _first_line(err: Exception, limit: int = 240) -> str:
    """``err``'s message on one line (its lines joined), at most ``limit`` characters."""
    text = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dt(dtypes) -> str:
    return " or ".join(str(t).removeprefix("torch.") for t in dtypes)
