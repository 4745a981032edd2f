"""The int8 KV cache on an ONNX decoder with KV cache I/O: the cache inputs and outputs become int8.

Per layer, ``present_key = Concat(past_key, k)`` becomes ``Concat(past_key int8, QuantizeLinear(k))``: the
concat runs in int8 and ``present.*`` is the int8 cache a runtime feeds back as ``past_key_values.*``.
Attention then reads ``DequantizeLinear(present_key)`` in float. Scales and zero points are the recipe's, as
initializers (see :mod:`qpass.passes.onnx.qdq` for the layout change around the per-axis ops): C8's
``kv_k`` / ``kv_v`` (``[kv_heads * head_dim]``), or with FAQuant alone its ``fa_k`` / ``fa_v``
(``[kv_heads, head_dim]``, the same channels ``h * head_dim + d``): FAQuant's K and V are what the cache
holds, so its cache is int8 too.
"""

import onnx_ir as ir

from qpass.core.errors import QpassError
from qpass.core.naming import onnx_name
from qpass.core.recipe import Recipe
from qpass.core.sites import AttentionSite
from qpass.passes.onnx import qdq
from qpass.passes.onnx.base import SitePass
from qpass.passes.onnx.find_attention_sites import CacheIO

DEQUANTIZED = ".dequantized"  # suffix of the float cache value attention reads (the FAQuant pass finds it by it)
CACHE_SCALES = {"kv": "--kv-int8", "fa": "--fa-quant"}  # whose k/v scales a cache holds -> the flag for it


class InsertKVCacheQDQPass(SitePass):
    """Quantize each site's k and v into the cache and dequantize what attention reads; ``count``: values rewritten."""

    def __init__(self, sites: list[tuple[AttentionSite, CacheIO | None]], recipe: Recipe, scales: str = "kv"):
        """``scales``: whose k/v scales the cache holds, ``kv`` (C8) or ``fa`` (FAQuant alone)."""
        if scales not in CACHE_SCALES:
            raise ValueError(f"scales={scales!r} is not one of {', '.join(CACHE_SCALES)}")
        super().__init__(sites, recipe)
        self.scales = scales

    def rewrite(self, model: ir.Model) -> int:
        graph, values, count = model.graph, qdq.named_values(model.graph), 0
        for site, cache in self.sites:
            if cache is None:
                where = f"{CACHE_SCALES[self.scales]}: attention {site.layer} ({site.attention})"
                raise QpassError(
                    f"{where} has no KV cache inputs and outputs; export the decoder with "
                    "past_key_values.* inputs and present.* outputs"
                )
            for kind, past, present in (
                ("k", cache.past_key, cache.present_key),
                ("v", cache.past_value, cache.present_value),
            ):
                name = f"{self.scales}_{kind}"
                tag = onnx_name(site.layer, name)
                scale, zero = qdq.qparams(graph, tag, *self.recipe.get(site.layer, name))
                new, past_value, present_value = values[getattr(site, kind)], values[past], values[present]
                concat = present_value.producer()
                q_nodes, q_out = qdq.quantize(graph, new, scale, zero, site.num_kv_heads, site.head_dim, tag)
                graph.insert_before(concat, q_nodes)
                concat.replace_input_with(1, q_out)
                for v in (past_value, present_value):
                    v.type = ir.TensorType(ir.DataType.INT8)
                dq_nodes, dq_out = qdq.dequantize(
                    graph, present_value, scale, zero, site.num_kv_heads, site.head_dim, tag
                )
                dq_out.name = present + DEQUANTIZED
                qdq.replace_uses(present_value, dq_out, keep=set(dq_nodes))
                graph.insert_after(concat, dq_nodes)
                count += 1
        return count
