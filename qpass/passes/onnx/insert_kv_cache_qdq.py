"""C8 on an ONNX decoder with KV cache I/O: the cache inputs and outputs become int8.

Per layer, ``present_key = Concat(past_key, k)`` becomes ``Concat(past_key int8, QuantizeLinear(k))``: the
concat runs in int8 and ``present.*`` is the int8 cache a runtime feeds back as ``past_key_values.*``.
Attention then reads ``DequantizeLinear(present_key)`` in float. Scales and zero points are the recipe's
``kv_k`` / ``kv_v`` (``[kv_heads * head_dim]``), as initializers (see :mod:`qpass.passes.onnx.qdq` for the
layout change around the per-axis ops).
"""

import onnx_ir as ir

from qpass.core.errors import QpassError
from qpass.core.naming import onnx_name
from qpass.passes.onnx import qdq
from qpass.passes.onnx.base import SitePass

DEQUANTIZED = ".dequantized"  # suffix of the float cache value attention reads (the FAQuant pass finds it by it)


class InsertKVCacheQDQPass(SitePass):
    """Quantize each site's k and v into the cache and dequantize what attention reads; ``count``: values rewritten."""

    def rewrite(self, model: ir.Model) -> int:
        graph, values, count = model.graph, qdq.named_values(model.graph), 0
        for site, cache in self.sites:
            if cache is None:
                raise QpassError(f"--kv-int8: attention {site.layer} ({site.attention}) has no KV cache inputs and outputs; "
                                 "export the decoder with past_key_values.* inputs and present.* outputs")
            for kind, past, present in (("k", cache.past_key, cache.present_key), ("v", cache.past_value, cache.present_value)):
                scale, zero = qdq.qparams(graph, onnx_name(site.layer, f"kv_{kind}"), *self.recipe.get(site.layer, f"kv_{kind}"))
                new, past_value, present_value = values[getattr(site, kind)], values[past], values[present]
                concat = present_value.producer()
                tag = onnx_name(site.layer, f"kv_{kind}")
                q_nodes, q_out = qdq.quantize(graph, new, scale, zero, site.num_kv_heads, site.head_dim, tag)
                graph.insert_before(concat, q_nodes)
                concat.replace_input_with(1, q_out)
                for v in (past_value, present_value):
                    v.type = ir.TensorType(ir.DataType.INT8)
                dq_nodes, dq_out = qdq.dequantize(graph, present_value, scale, zero, site.num_kv_heads, site.head_dim, tag)
                dq_out.name = present + DEQUANTIZED
                qdq.replace_uses(present_value, dq_out, keep=set(dq_nodes))
                graph.insert_after(concat, dq_nodes)
                count += 1
        return count

