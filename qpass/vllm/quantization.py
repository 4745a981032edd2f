"""The ``qpass`` quantization method in vLLM: what a ``--format vllm`` directory's ``quantization_config`` names
when it quantizes attention (:mod:`qpass.exporters.vllm_format`).

Linears go to compressed-tensors (the config's ``linear`` section, the same dict a W8A8-only directory carries as
its whole ``quantization_config``, one config group or, with static and per-token Linears, two; compressed-tensors
picks each layer's) or stay float. Each attention layer gets :class:`QpassAttentionMethod`, which
creates the layer's grids as parameters (so vLLM's loader reads them from the checkpoint, each tensor-parallel rank
its own KV heads' rows), makes the layer's KV cache int8 and puts one of :mod:`qpass.vllm.backend`'s backends
in place of the attention backend vLLM chose.
"""

from typing import Any

import torch
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.quantization.kv_cache import BaseKVCacheMethod
from vllm.v1.attention.backends.registry import AttentionBackendEnum

from qpass.exporters.vllm_format import (
    QUANT_METHOD,
    attention_tensors,
    check_quantization_config,
)
from qpass.vllm.backend import DYNAMIC_NAME, NAME, QpassInt8Backend, QpassInt8DynamicBackend, QpassInt8Impl
from qpass.vllm.int8_layer import Grids


class QpassPluginError(ValueError):
    """A model or setting the plugin cannot run, in one line with the way out (vLLM reports it at start-up)."""


@register_quantization_config(QUANT_METHOD)
class QpassConfig(QuantizationConfig):
    def __init__(self, doc: dict):
        super().__init__()
        self.doc = doc
        self.kv_cache, self.fa_quant = doc["kv_cache"], doc["fa_quant"]
        self.linear = None
        if doc.get("linear"):
            from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
                CompressedTensorsConfig,
            )

            self.linear = CompressedTensorsConfig.from_config(doc["linear"])

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "QpassConfig":
        why = check_quantization_config(config)
        if why:
            raise QpassPluginError(why)
        return cls(config)

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        """The model's renaming of checkpoint paths, passed on to the compressed-tensors config inside: vLLM calls this
        on the config it built (this one), and a directory whose Linears mix static and per-token activations targets
        them by module path (:mod:`qpass.exporters.vllm_format`)."""
        if self.linear is not None:
            self.linear.apply_vllm_mapper(hf_to_vllm_mapper)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, Attention):
            return QpassAttentionMethod(self)
        if self.linear is not None:
            self.linear.packed_modules_mapping = self.packed_modules_mapping  # the model sets it on this config
            return self.linear.get_quant_method(layer, prefix)
        if isinstance(layer, LinearBase):
            return UnquantizedLinearMethod()
        return None


def _refusal(layer: Attention) -> str | None:
    """Why qpass's backend cannot run ``layer``, in one line with the way out, or None."""
    impl = layer.impl
    rules = (
        (f"{layer.layer_name}: qpass's int8 attention runs decoder self-attention only", layer.attn_type != "decoder"),
        (
            f"{layer.layer_name}: a sliding window of {layer.sliding_window} tokens; qpass's paged int8 attention is "
            "causal over the whole context: serve this model without qpass attention quantization",
            layer.sliding_window is not None,
        ),
        (
            f"{layer.layer_name}: ALiBi, logit soft-capping or attention sinks; qpass's paged int8 attention has none",
            getattr(impl, "alibi_slopes", None) is not None or getattr(impl, "logits_soft_cap", 0) or layer.has_sink,
        ),
        (
            f"{layer.layer_name}: head_dim {layer.head_size}; qpass's paged int8 attention runs head_dim "
            f"{', '.join(map(str, QpassInt8Backend.get_supported_head_sizes()))}",
            layer.head_size not in QpassInt8Backend.get_supported_head_sizes(),
        ),
        (
            f"{layer.layer_name}: the KV cache dtype is {layer.kv_cache_dtype!r}; a qpass model's cache is int8 by "
            "its checkpoint: drop --kv-cache-dtype",
            layer.kv_cache_dtype != "auto",
        ),
    )
    return next((why for why, broken in rules if broken), None)


class QpassAttentionMethod(BaseKVCacheMethod):
    """An attention layer of a qpass model: its grids as parameters, an int8 cache, qpass's backend."""

    def create_weights(self, layer: torch.nn.Module):
        why = _refusal(layer)
        if why:
            raise QpassPluginError(why)
        tp, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        for name, kind in attention_tensors(self.quant_config.doc).items():
            local = layer.num_heads if kind == "q" else layer.num_kv_heads
            param = torch.nn.Parameter(torch.zeros(local * layer.head_size), requires_grad=False)
            param.weight_loader = _rows_of_rank(f"{layer.layer_name}.{name}", local * layer.head_size, tp, rank)
            layer.register_parameter(name, param)
        layer.kv_cache_torch_dtype = torch.int8  # vLLM sizes the layer's pages from it
        dynamic = self.quant_config.kv_cache == "dynamic"
        layer.attn_backend = QpassInt8DynamicBackend if dynamic else QpassInt8Backend
        layer.backend = AttentionBackendEnum[DYNAMIC_NAME if dynamic else NAME]
        layer.impl = QpassInt8Impl(
            layer.num_heads,
            layer.head_size,
            layer.impl.scale,
            layer.num_kv_heads,
            sliding_window=None,
            kv_cache_dtype="auto",
            kv_sharing_target_layer_name=layer.kv_sharing_target_layer_name,
        )

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        doc, d = self.quant_config.doc, layer.head_size

        def grid(kind_prefix: str, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
            scale = getattr(layer, f"{kind_prefix}_scale").detach().float().reshape(heads, d).clone()
            offset = getattr(layer, f"{kind_prefix}_offset").detach().float().reshape(heads, d).clone()
            if not (torch.isfinite(scale).all() and (scale > 0).all()):
                raise QpassPluginError(
                    f"{layer.layer_name}.{kind_prefix}_scale holds a value that is not a positive finite number; "
                    "recompile the directory with qpass"
                )
            return scale, offset

        kv, fa = doc["kv_cache"] == "static", doc["fa_quant"]
        h, hk = layer.num_heads, layer.num_kv_heads
        c8 = (grid("qpass_c8_key", hk), grid("qpass_c8_value", hk)) if kv else (None, None)
        fa_grids = (grid("qpass_fa_query", h), grid("qpass_fa_key", hk), grid("qpass_fa_value", hk)) if fa else None
        if fa_grids:  # the cache holds FAQuant's codes; C8's round trip (if any) comes first
            layer.impl.grids = Grids(fa_grids[1], fa_grids[2], fa_grids[0], *c8)
        else:  # C8, or the dynamic cache (no grids: its pairs are computed as it is written)
            layer.impl.grids = Grids(*c8)


def _rows_of_rank(name: str, rows: int, tp: int, rank: int):
    """A weight loader that keeps this rank's ``rows`` of a flat ``[tp * rows]`` checkpoint tensor (its heads)."""

    def load(param: torch.nn.Parameter, loaded: torch.Tensor) -> None:
        flat = loaded.reshape(-1)
        if flat.numel() != rows * tp:
            raise QpassPluginError(
                f"{name} has {flat.numel()} values, expected {rows * tp} ({tp} tensor-parallel ranks of {rows}); "
                "the KV heads must divide evenly among the ranks: choose a --tensor-parallel-size that divides them"
            )
        param.data.copy_(flat[rank * rows : (rank + 1) * rows].float())

    return load
