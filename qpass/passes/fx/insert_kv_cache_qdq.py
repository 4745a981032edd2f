"""The int8 KV cache's Q/DQ on K and V where they are written to the cache: C8 (static, per channel) or
the dynamic cache (per token and kv head)."""

from torch.fx import GraphModule

from qpass.core.recipe import Recipe
from qpass.core.sites import AttentionSite
from qpass.passes.fx.base import CountingPass
from qpass.passes.fx.qdq import insert_dynamic_fake_quant, insert_site_qdq


class InsertKVCacheQDQPass(CountingPass):
    """Insert the cache's round trip on each site's k and v; counts them.

    ``kv_cache="static"`` (C8): Quantize/Dequantize with the recipe's ``kv_k``/``kv_v`` scales
    (``[kv_heads * head_dim]``). ``kv_cache="dynamic"``: ``fake_quant_int8_dynamic``, each token and kv head
    with the symmetric scale of its own values (the recipe holds no K/V tensors).
    The site's k and v are the values before GQA's repeat, i.e. what a KV cache stores.
    """

    def __init__(self, sites: list[AttentionSite], recipe: Recipe):
        super().__init__()
        self.sites, self.recipe = sites, recipe

    def rewrite(self, gm: GraphModule) -> int:
        if self.recipe.config.kv_cache != "dynamic":
            return insert_site_qdq(gm, self.sites, self.recipe, ("k", "v"), "kv")
        nodes = {n.name: n for n in gm.graph.nodes}
        for site in self.sites:
            for kind in ("k", "v"):
                insert_dynamic_fake_quant(gm, nodes[getattr(site, kind)])
        return 2 * len(self.sites)
