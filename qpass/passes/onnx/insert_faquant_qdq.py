"""FAQuant on an ONNX decoder: QuantizeLinear/DequantizeLinear on q, k and v after RoPE, per head and dim.

The recipe's ``fa_q`` (``[heads, head_dim]``) and ``fa_k`` / ``fa_v`` (``[kv_heads, head_dim]``). q's round
trip sits where attention reads it. K and V are quantized as attention reads them: with C8, after the int8
cache is dequantized (C8's round trip first, as the PyTorch path orders them); on a model without cache I/O,
where attention reads them. With FAQuant alone the int8 cache holds K and V on FAQuant's own grid
(``InsertKVCacheQDQPass`` with ``fa`` scales), so the pipeline asks this pass for q only (``kinds``): a second
round trip with the same scales would change nothing.
"""

import onnx_ir as ir

from qpass.core.naming import onnx_name
from qpass.core.recipe import Recipe
from qpass.core.sites import AttentionSite
from qpass.passes.onnx import qdq
from qpass.passes.onnx.base import SitePass
from qpass.passes.onnx.find_attention_sites import CacheIO
from qpass.passes.onnx.insert_kv_cache_qdq import DEQUANTIZED

KINDS = ("q", "k", "v")


class InsertFAQuantQDQPass(SitePass):
    """Insert FAQuant's round trip on each site's ``kinds`` of q, k and v; ``count``: values rewritten."""

    def __init__(
        self, sites: list[tuple[AttentionSite, CacheIO | None]], recipe: Recipe, kinds: tuple[str, ...] = KINDS
    ):
        if not kinds or set(kinds) - set(KINDS):
            raise ValueError(f"kinds={kinds!r}: give some of {', '.join(KINDS)}")
        super().__init__(sites, recipe)
        self.kinds = kinds

    def rewrite(self, model: ir.Model) -> int:
        graph, values, count = model.graph, qdq.named_values(model.graph), 0
        for site, cache in self.sites:
            for kind in self.kinds:
                target = values[getattr(site, kind)]
                if cache is not None and kind != "q":
                    present = cache.present_key if kind == "k" else cache.present_value
                    target = values.get(present + DEQUANTIZED, target)
                heads = site.num_heads if kind == "q" else site.num_kv_heads
                tag = onnx_name(site.layer, f"fa_{kind}")
                scale, zero = qdq.qparams(graph, tag, *self.recipe.get(site.layer, f"fa_{kind}"))
                nodes, out = qdq.fake_quantize(graph, target, scale, zero, heads, site.head_dim, tag)
                qdq.replace_uses(target, out, keep=set(nodes))
                graph.insert_after(target.producer(), nodes)  # q, k, v are computed: never graph inputs
                count += 1
        return count
