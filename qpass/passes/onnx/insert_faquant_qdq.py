"""FAQuant on an ONNX decoder: QuantizeLinear/DequantizeLinear on q, k and v after RoPE, per head and dim.

The recipe's ``fa_q`` (``[heads, head_dim]``) and ``fa_k`` / ``fa_v`` (``[kv_heads, head_dim]``). q's round
trip sits where attention reads it. K and V are quantized as attention reads them: with C8, after the int8
cache is dequantized (C8's round trip first, as the PyTorch path orders them); without it, on the new
tokens before the float cache's Concat, so the cache holds values already on FAQuant's grid.
"""

import onnx_ir as ir

from qpass.core.naming import onnx_name
from qpass.passes.onnx import qdq
from qpass.passes.onnx.base import SitePass
from qpass.passes.onnx.insert_kv_cache_qdq import DEQUANTIZED


class InsertFAQuantQDQPass(SitePass):
    """Insert FAQuant's round trip on each site's q, k and v; ``count``: values rewritten."""

    def rewrite(self, model: ir.Model) -> int:
        graph, values, count = model.graph, qdq.named_values(model.graph), 0
        for site, cache in self.sites:
            for kind in ("q", "k", "v"):
                target = values[getattr(site, kind)]
                if cache is not None and kind != "q":
                    target = values.get((cache.present_key if kind == "k" else cache.present_value) + DEQUANTIZED, target)
                heads = site.num_heads if kind == "q" else site.num_kv_heads
                tag = onnx_name(site.layer, f"fa_{kind}")
                scale, zero = qdq.qparams(graph, tag, *self.recipe.get(site.layer, f"fa_{kind}"))
                nodes, out = qdq.fake_quantize(graph, target, scale, zero, heads, site.head_dim, tag)
                qdq.replace_uses(target, out, keep=set(nodes))
                graph.insert_after(target.producer(), nodes)  # q, k, v are computed: never graph inputs
                count += 1
        return count
