"""Lower C8's QDQ cache for ONNX Runtime: attention reads the int8 cache through a Cast, its scales folded away.

After ``InsertKVCacheQDQPass`` attention reads ``DequantizeLinear(present)``, which for a per-channel scale on a
``[B, kv_heads, T, head_dim]`` cache needs a transpose of the whole int8 cache in and of the whole float cache out
at every decode step (measured 2.6x the float graph's cache traffic per layer at T = 2048). The scales fold
instead (the paged int8 kernels' math, ``../shared/DESIGN.md``), per query head h reading KV head ``h // rep``:

- K: ``q . ((k_code - z_k) * s_k) = (q * s_k) . k_code - (q * s_k) . z_k``; the second term is the same for every
  key of a query, and softmax cancels it: attention reads ``Cast(present_key)`` and q is multiplied by ``s_k``;
- V: the softmax weights of a query sum to one, so ``sum_t p_t (v_code_t - z_v) * s_v = (p . v_code - z_v) * s_v``:
  attention reads ``Cast(present_value)`` and its output gets ``- z_v`` and ``* s_v``.

The int8 cache I/O and ``QuantizeLinear`` before the Concat are unchanged. The cache's scales are C8's
(``kv``) or, with FAQuant alone, FAQuant's (``fa``): there q's FAQuant round trip comes after this pass, on q
itself, so the ``Mul`` by ``s_k`` reads the quantized q. Not with C8 and FAQuant together: FAQuant then
quantizes the dequantized K and V themselves. A softcapped ``Attention`` (no longer shift-invariant) keeps
the QDQ form.
"""

from functools import partial

import numpy as np
import onnx_ir as ir
import torch
from onnx_ir.passes.common import RemoveUnusedNodesPass

from qpass.core.naming import onnx_name
from qpass.core.recipe import Recipe
from qpass.core.sites import AttentionSite
from qpass.passes.onnx import qdq
from qpass.passes.onnx.base import SitePass
from qpass.passes.onnx.find_attention_sites import CacheIO
from qpass.passes.onnx.insert_kv_cache_qdq import CACHE_SCALES, DEQUANTIZED


class FoldKVCacheScalesPass(SitePass):
    """Replace each dequantized cache with a Cast and fold its scales into q and the attention output; ``count``:
    sites lowered."""

    def __init__(self, sites: list[tuple[AttentionSite, CacheIO | None]], recipe: Recipe, scales: str = "kv"):
        """``scales``: whose k/v scales the cache holds, as ``InsertKVCacheQDQPass`` was given them."""
        if scales not in CACHE_SCALES:
            raise ValueError(f"scales={scales!r} is not one of {', '.join(CACHE_SCALES)}")
        super().__init__(sites, recipe)
        self.scales = scales

    def rewrite(self, model: ir.Model) -> int:
        graph, values, count = model.graph, qdq.named_values(model.graph), 0
        for site, cache in self.sites:
            attention = values[site.attention].producer()
            if cache is None or not _shift_invariant(attention):
                continue
            dequantized = [values.get(name + DEQUANTIZED) for name in (cache.present_key, cache.present_value)]
            if None in dequantized:
                continue
            for name, value in zip((cache.present_key, cache.present_value), dequantized):
                cast = qdq.node(
                    "Cast", [values[name]], onnx_name(site.layer, f"{name}.cast"), ir.AttrInt64("to", ir.DataType.FLOAT)
                )
                graph.insert_after(values[name].producer(), cast)
                value.replace_all_uses_with(cast.outputs[0])
            tag = partial(onnx_name, site.layer)
            s_k, _ = self._per_head(site, "k")
            s_v, z_v = self._per_head(site, "v")
            k_scale, v_scale = tag(f"{self.scales}_k.scale_per_head"), tag(f"{self.scales}_v.scale_per_head")
            v_offset = tag(f"{self.scales}_v.offset_per_head")
            q = values[site.q]
            scale_q = qdq.node("Mul", [q, qdq.initializer(graph, k_scale, s_k)], tag("fold_k_scale"))
            qdq.replace_uses(q, scale_q.outputs[0], keep={scale_q})
            graph.insert_after(q.producer(), scale_q)
            out = values[site.attention]
            sub = qdq.node("Sub", [out, qdq.initializer(graph, v_offset, z_v)], tag("fold_v_offset"))
            mul = qdq.node("Mul", [sub.outputs[0], qdq.initializer(graph, v_scale, s_v)], tag("fold_v_scale"))
            qdq.replace_uses(out, mul.outputs[0], keep={sub})
            graph.insert_after(attention, [sub, mul])
            count += 1
        if count:
            RemoveUnusedNodesPass()(model)  # the DequantizeLinear chains nothing reads now
        return count

    def _per_head(self, site: AttentionSite, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """``(scale, offset)`` of the cache's ``<kind>`` (``kv_k`` or ``fa_k``, ``[kv_heads * head_dim]`` or
        ``[kv_heads, head_dim]``) as float32 ``[1, heads, 1, head_dim]``, query head h taking KV head
        ``h // (heads / kv_heads)`` (GQA's repeat)."""
        scale, offset = self.recipe.get(site.layer, f"{self.scales}_{kind}")
        rep = site.num_heads // site.num_kv_heads

        def per_head(t: torch.Tensor) -> np.ndarray:
            heads = t.double().reshape(site.num_kv_heads, site.head_dim).repeat_interleave(rep, 0)
            return heads.reshape(1, site.num_heads, 1, site.head_dim).float().numpy()

        return per_head(scale), per_head(offset)


def _shift_invariant(attention: ir.Node) -> bool:
    """Whether adding a constant to every score of a query leaves the output unchanged (no softcap)."""
    softcap = attention.attributes.get("softcap") if attention.op_type == "Attention" else None
    return softcap is None or softcap.as_float() == 0.0
