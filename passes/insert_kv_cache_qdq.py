"""C8: Quantize/Dequantize on K and V where they are written to the KV cache, per channel."""

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from qpass.passes.find_attention_sites import AttentionSite
from qpass.passes.qdq import insert_qdq, per_head
from qpass.recipe import Recipe


class InsertKVCacheQDQPass(PassBase):
    """Insert Q/DQ with the recipe's ``kv_k``/``kv_v`` scales (``[kv_heads * head_dim]``). In place.

    The site's k and v are the values before GQA's repeat, i.e. what a KV cache stores.
    """

    in_place = True

    def __init__(self, sites: list[AttentionSite], recipe: Recipe):
        super().__init__()
        self.sites, self.recipe = sites, recipe
        self.inserted = 0

    def call(self, gm: GraphModule) -> PassResult:
        nodes = {n.name: n for n in gm.graph.nodes}
        before = self.inserted
        for site in self.sites:
            for kind in ("k", "v"):
                scale, offset = self.recipe.get(site.layer, f"kv_{kind}")
                insert_qdq(gm, nodes[getattr(site, kind)], per_head(scale, site.num_kv_heads, site.head_dim),
                           per_head(offset, site.num_kv_heads, site.head_dim), f"qpass_kv_{kind}_{site.layer}")
                self.inserted += 1
        return PassResult(gm, self.inserted > before)
