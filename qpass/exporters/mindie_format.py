"""The Ascend MindIE quantized weight directory (``../shared/FORMATS.md`` section 1): its files and names.

:mod:`qpass.exporters.mindie_write` writes it; :mod:`qpass.exporters.mindie_load` reads it back into a
Hugging Face model that runs the format's integer arithmetic on the CPU.

A directory holds ``config.json`` (with ``quantization_config``), ``quant_model_weight_w8a8.safetensors``
(every tensor, float ones included), ``quant_model_description.json`` (tensor name -> ``FLOAT`` / ``W8A8`` /
``FAQuant`` plus the model-level keys) and the tokenizer files. A layer-wise compile writes the weights in
shards instead, as msModelSlim's saver does when it splits them: ``quant_model_weight_w8a8-00001-of-000NN.safetensors``
(one per decoder layer, then one for the rest) and ``quant_model_weight_w8a8.safetensors.index.json``
(``{"metadata": {"total_size": bytes}, "weight_map": {tensor: shard}}``). Per quantized Linear ``<p>``:

    <p>.weight        int8                 [n, k]   symmetric per output channel
    <p>.input_scale   model dtype          [1]      per-tensor activation scale
    <p>.input_offset  model dtype          [1]      activation offset (an integer value)
    <p>.deq_scale     int64 (float16 model: the float32 bits of input_scale * weight_scale as int32, widened)
                      float32 (bfloat16 model)                                      [n]
    <p>.quant_bias    int32                [n]      round(bias / deq_scale - sum_k Wq[n, k] * input_offset)
    <p>.weight_scale, <p>.weight_offset  float32  [n, 1]   (offset 0)

Per attention ``<a>`` (the site's module path, e.g. ``model.layers.<i>.self_attn``): FAQuant
``<a>.fa_q.scale/.offset [q_heads, head_dim]``, ``<a>.fa_k|fa_v.scale/.offset [kv_heads, head_dim]``; C8
``<a>.k_proj|v_proj.kv_cache_scale/_offset [kv_heads * head_dim]``; all in the model dtype. The names come
from the sites; a model whose K and V projections are not the separate ``<a>.k_proj`` and ``<a>.v_proj``
modules the format names (a fused ``qkv_proj``, GPT-2's ``c_attn``) cannot be written.

Offsets, sign convention: this module writes and reads msModelSlim's convention, which is also qpass's
(:mod:`qpass.core.recipe`): ``q = clamp(round(x / scale) + offset)``, ``x = (q - offset) * scale``. Offsets are
therefore copied between a recipe and the files unchanged. (Ascend's kernels compute ``(q + offset) * scale``;
MindIE negates the offsets when it loads them, so files must not be pre-negated.)

The loader computes in float32 by default: float16 / bfloat16 values widen to float32 exactly, so the model
it builds is the exported one, with W8A8 Linears in int8 x int8 -> int32 (:class:`qpass.runtime.w8a8.W8A8Linear`)
and FAQuant / C8 applied by qpass's passes from the :class:`Recipe` it returns.
"""

from pathlib import Path

WEIGHTS_FILE = "quant_model_weight_w8a8.safetensors"
WEIGHTS_INDEX = "quant_model_weight_w8a8.safetensors.index.json"  # sharded weights (a layer-wise compile)
DESCRIPTION_FILE = "quant_model_description.json"
CONFIG_FILE = "config.json"
FLOAT, W8A8, FAQUANT, C8 = "FLOAT", "W8A8", "FAQuant", "C8"
W8A8_DYNAMIC = "W8A8_DYNAMIC"  # msModelSlim's per-token dynamic activations: weight, weight_scale, weight_offset
FA_TYPES = ("FAQuant", "FAKQuant")  # fa_quant_type values: MindIE's documentation; msModelSlim's current saver
MODEL_KEYS = (
    "model_quant_type",
    "fa_quant_type",
    "kv_cache_type",
    "kv_quant_type",
)  # description keys that are not tensors
W8A8_SUFFIXES = ("weight", "input_scale", "input_offset", "deq_scale", "quant_bias", "weight_scale", "weight_offset")
W8A8_DYNAMIC_SUFFIXES = ("weight", "weight_scale", "weight_offset")
FA_KINDS = ("fa_q", "fa_k", "fa_v")
C8_PROJECTIONS = {"kv_k": "k_proj", "kv_v": "v_proj"}  # recipe kind -> the projection module the format names


def shard_name(i: int, count: int) -> str:
    """The ``i``-th (from 1) of ``count`` weight shards, named as msModelSlim's saver names them."""
    return f"quant_model_weight_w8a8-{i:05d}-of-{count:05d}.safetensors"


def detect(path: str | Path) -> bool:
    """Whether ``path`` is a MindIE quantized weight directory (it has ``quant_model_description.json``)."""
    return (Path(path) / DESCRIPTION_FILE).is_file()
