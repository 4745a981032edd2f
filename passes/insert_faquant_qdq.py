"""FAQuant: Quantize/Dequantize on Q, K and V after RoPE, per head and per dim."""

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from qpass.passes.find_attention_sites import AttentionSite
from qpass.passes.qdq import insert_site_qdq
from qpass.recipe import Recipe


class InsertFAQuantQDQPass(PassBase):
    """Insert Q/DQ with the recipe's ``fa_q``/``fa_k``/``fa_v`` scales (``[heads, head_dim]``). In place."""

    in_place = True

    def __init__(self, sites: list[AttentionSite], recipe: Recipe):
        super().__init__()
        self.sites, self.recipe = sites, recipe
        self.inserted = 0

    def call(self, gm: GraphModule) -> PassResult:
        count = insert_site_qdq(gm, self.sites, self.recipe, ("q", "k", "v"), "fa")
        self.inserted += count
        return PassResult(gm, count > 0)
