"""FAQuant: Quantize/Dequantize on Q, K and V after RoPE, per head and per dim."""

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from qpass.passes.find_attention_sites import AttentionSite
from qpass.passes.qdq import insert_qdq, per_head
from qpass.recipe import Recipe


class InsertFAQuantQDQPass(PassBase):
    """Insert Q/DQ with the recipe's ``fa_q``/``fa_k``/``fa_v`` scales (``[heads, head_dim]``). In place."""

    in_place = True

    def __init__(self, sites: list[AttentionSite], recipe: Recipe):
        super().__init__()
        self.sites, self.recipe = sites, recipe
        self.inserted = 0

    def call(self, gm: GraphModule) -> PassResult:
        nodes = {n.name: n for n in gm.graph.nodes}
        before = self.inserted
        for site in self.sites:
            for kind, heads in (("q", site.num_heads), ("k", site.num_kv_heads), ("v", site.num_kv_heads)):
                scale, offset = self.recipe.get(site.layer, f"fa_{kind}")
                insert_qdq(gm, nodes[getattr(site, kind)], per_head(scale, heads, site.head_dim),
                           per_head(offset, heads, site.head_dim), f"qpass_fa_{kind}_{site.layer}")
                self.inserted += 1
        return PassResult(gm, self.inserted > before)
