"""A test-side model of how vllm-ascend (with vLLM's Llama/Qwen2 loaders) reads an msModelSlim-style
W8A8 + C8 directory, written from reading their source (vllm_ascend/quantization/modelslim_config.py,
methods/w8a8_static.py, methods/w8a8_dynamic.py, methods/kv_c8.py, attention_v1.py; vLLM's AutoWeightsLoader and
the models' stacked-parameter mappings). It copies no code; each rule below names the behaviour it models. Each
Linear's method is its weight's own description type (W8A8, W8A8_DYNAMIC or FLOAT; ``get_linear_quant_type``), one
per fused layer.

``load(directory)`` returns ``{vLLM parameter name: tensor}`` after the same decisions and checks, and
raises ``LoaderError`` where vllm-ascend would fail (KeyError, ValueError, a shape it cannot view).
"""

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

# vLLM's stacked parameters (LlamaModel / Qwen2Model): shard name -> (fused module, shard id)
STACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# vllm-ascend's cache-scale mapper: checkpoint suffix -> Attention parameter
CACHE_SCALES = {
    ".k_proj.kv_cache_scale": ".attn.k_cache_scale",
    ".k_proj.kv_cache_offset": ".attn.k_cache_offset",
    ".v_proj.kv_cache_scale": ".attn.v_cache_scale",
    ".v_proj.kv_cache_offset": ".attn.v_cache_offset",
}
# AscendW8A8LinearMethod's parameters: name -> (dtype for float16 / bfloat16 models, shape given out, in)
W8A8_PARAMS = {
    "weight": (lambda dt: torch.int8, lambda n, k: (n, k)),
    "input_scale": (lambda dt: dt, lambda n, k: (1,)),
    "input_offset": (lambda dt: torch.int8, lambda n, k: (1,)),
    "quant_bias": (lambda dt: torch.int32, lambda n, k: (n,)),
    "deq_scale": (lambda dt: torch.int64 if dt == torch.float16 else torch.float32, lambda n, k: (n,)),
    "weight_scale": (lambda dt: dt, lambda n, k: (n, 1)),
    "weight_offset": (lambda dt: dt, lambda n, k: (n, 1)),
}
OPTIONAL = {"weight_scale", "weight_offset"}  # created, never used by apply(); vLLM 0.27 does not insist on them
# AscendW8A8DynamicLinearMethod's parameters (apply() quantizes x per token and passes the layer's float bias)
W8A8_DYNAMIC_PARAMS = {
    "weight": (lambda dt: torch.int8, lambda n, k: (n, k)),
    "weight_scale": (lambda dt: dt, lambda n, k: (n, 1)),
    "weight_offset": (lambda dt: dt, lambda n, k: (n, 1)),
}
PARAMS = {"W8A8": (W8A8_PARAMS, OPTIONAL), "W8A8_DYNAMIC": (W8A8_DYNAMIC_PARAMS, {"weight_offset"})}


class LoaderError(Exception):
    """Where vllm-ascend would stop loading."""


def load(directory) -> dict[str, torch.Tensor]:
    d = Path(directory)
    config = json.loads((d / "config.json").read_text())
    if not config.get("architectures"):
        raise LoaderError("config.json has no architectures: vLLM cannot pick a model class")
    if config.get("quantization_config"):
        # vLLM builds the quant config from this block, and the description is never read: the first
        # Linear's lookup of "<prefix>.weight" in it fails.
        description = dict(config["quantization_config"])
    else:
        description = json.loads((d / "quant_model_description.json").read_text())
    tensors = {}
    for f in sorted(d.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[config.get("torch_dtype") or config.get("dtype")]
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    c8 = description.get("kv_cache_type") == "C8"  # kv_quant_type is not read
    if description.get("fa_quant_type"):
        raise LoaderError(
            "fa_quant_type is set: only FAKQuant on MLA models is registered; dense FAQuant does not load"
        )
    c8_layers = {
        int(m.group(1)) for k in description if "k_proj.kv_cache_scale" in k and (m := re.search(r"\.(\d+)\.", k))
    }

    def lookup(key):
        if key not in description:
            raise LoaderError(f"KeyError: {key!r} (no quant type in the description)")
        return description[key]

    # Every module vLLM builds asks for its scheme: the LM head too (vLLM's Llama builds it even when tied).
    if config.get("model_type") == "llama" or not config.get("tie_word_embeddings"):
        lookup("lm_head.weight")
    if not any(v == "FLOAT" and k.endswith(".weight") for k, v in description.items()):
        raise LoaderError(
            "KeyError: '.weight' (embed_tokens has no prefix in vLLM's Llama; some FLOAT weight must exist)"
        )
    loaded, used = {}, set()
    for i in range(layers):
        prefix = f"model.layers.{i}"
        modules = {"qkv_proj": "self_attn", "o_proj": "self_attn", "gate_up_proj": "mlp", "down_proj": "mlp"}
        for module, parent in modules.items():
            shards = PACKED.get(module, (module,))
            types = [lookup(f"{prefix}.{parent}.{s}.weight") for s in shards]
            if len(set(t == "FLOAT" for t in types)) > 1 or len(set(types)) > 1:
                raise LoaderError(
                    f"ValueError: {prefix}.{parent}.{module} fuses shards of types {types}; they must agree"
                )
            # the registry: W8A8 -> AscendW8A8LinearMethod, W8A8_DYNAMIC -> AscendW8A8DynamicLinearMethod
            if types[0] not in ("FLOAT", *PARAMS):
                raise LoaderError(f"NotImplementedError: quant type {types[0]!r} of {prefix}.{parent}.{module}")
            for s in shards:
                p = f"{prefix}.{parent}.{s}"
                if types[0] == "FLOAT":
                    _take(tensors, used, loaded, f"{p}.weight", dtype, module_name(p, module, "weight"))
                    continue
                n, k = tensors[f"{p}.weight"].shape if f"{p}.weight" in tensors else (None, None)
                params, optional = PARAMS[types[0]]
                for name, (dt, shape) in params.items():
                    key = f"{p}.{name}"
                    if key not in tensors:
                        if name in optional:
                            continue
                        raise LoaderError(f"{types[0]} {p} has no {name}")
                    want_dtype, want_shape = dt(dtype), shape(n, k)
                    t = tensors[key]
                    if tuple(t.shape) != want_shape:
                        raise LoaderError(f"{key}: shape {tuple(t.shape)}, the parameter is {want_shape}")
                    if name in ("weight", "quant_bias", "deq_scale") and t.dtype != want_dtype:
                        raise LoaderError(f"{key}: dtype {t.dtype}, the parameter is {want_dtype}")
                    loaded_name = module_name(p, module, name)
                    if module in PACKED and name in ("input_scale", "input_offset") and loaded_name in loaded:
                        # fused shards copy into one element: the last wins, so they must agree
                        if not torch.equal(loaded[loaded_name], t.to(want_dtype)):
                            raise LoaderError(
                                f"{key} differs from the other shards of {module}; the fused layer keeps one"
                            )
                    loaded[loaded_name] = t.to(want_dtype)
                    used.add(key)
                if types[0] == "W8A8" and f"{p}.bias" in tensors:  # into the layer's bias, which W8A8 never applies
                    used.add(f"{p}.bias")  # (W8A8_DYNAMIC's apply adds it: loaded with the other biases below)
        if c8:
            if i not in c8_layers:
                raise LoaderError(f"layer {i} has no k_proj.kv_cache_scale although kv_cache_type is C8")
            for suffix, param in CACHE_SCALES.items():
                key = f"{prefix}.self_attn{suffix}"
                if key not in tensors:
                    raise LoaderError(f"C8: no {key}")
                t = tensors[key].squeeze()
                if t.numel() != kv_heads * head_dim:  # attention_v1 views it as [kv_heads, 1, head_dim]
                    raise LoaderError(
                        f"{key}: {t.numel()} values, the decode path views [kv_heads={kv_heads}, 1, {head_dim}]"
                    )
                if "offset" in key and bool(t.any()):
                    raise LoaderError(f"{key} is not zero: vllm-ascend's decode dequantizes with the scale only")
                loaded[f"{prefix}.self_attn{param}"] = t.to(dtype)
                used.add(key)
        elif any(k.startswith(prefix + ".") and "kv_cache" in k for k in tensors):
            raise LoaderError(
                f"{prefix} has kv_cache tensors but kv_cache_type is not C8: they would be loaded into qkv_proj"
            )
        for norm in ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm"):
            key = f"{prefix}.{norm}.weight"
            if key in tensors:
                _take(tensors, used, loaded, key, dtype, key)
        for bias in [k for k in tensors if k.startswith(prefix + ".") and k.endswith(".bias") and k not in used]:
            _take(
                tensors,
                used,
                loaded,
                bias,
                dtype,
                bias.replace(".q_proj.", ".qkv_proj.")
                .replace(".k_proj.", ".qkv_proj.")
                .replace(".v_proj.", ".qkv_proj."),
            )
    for key in ("model.embed_tokens.weight", "model.norm.weight"):
        _take(tensors, used, loaded, key, dtype, key)
    if "lm_head.weight" in tensors:
        if config.get("tie_word_embeddings"):
            used.add("lm_head.weight")  # skip_prefixes=["lm_head."]: dropped
        else:
            _take(tensors, used, loaded, "lm_head.weight", dtype, "lm_head.weight")
    elif not config.get("tie_word_embeddings"):
        raise LoaderError("no lm_head.weight and the embeddings are not tied")
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise LoaderError(f"ValueError: There is no module or parameter named {unknown[0]!r}")
    return loaded


def module_name(path: str, module: str, param: str) -> str:
    """vLLM's name for a checkpoint parameter: q/k/v and gate/up go into their fused module."""
    parent, _, shard = path.rpartition(".")
    return f"{parent}.{STACKED[shard][0] if shard in STACKED else shard}.{param}"


def _take(tensors, used, loaded, key, dtype, name):
    if key not in tensors:
        raise LoaderError(f"no tensor {key}")
    t = tensors[key]
    if not t.is_floating_point():
        raise LoaderError(f"{key} is {t.dtype}, a float parameter")
    loaded[name] = t.to(dtype)
    used.add(key)
