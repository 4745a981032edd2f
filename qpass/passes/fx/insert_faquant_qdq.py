"""FAQuant: Quantize/Dequantize on Q, K and V after RoPE, per head and per dim."""

from torch.fx import GraphModule

from qpass.core.recipe import Recipe
from qpass.core.sites import AttentionSite
from qpass.passes.fx.base import CountingPass
from qpass.passes.fx.qdq import insert_site_qdq


class InsertFAQuantQDQPass(CountingPass):
    """Insert Q/DQ with the recipe's ``fa_q``/``fa_k``/``fa_v`` scales (``[heads, head_dim]``); counts the pairs."""

    def __init__(self, sites: list[AttentionSite], recipe: Recipe):
        super().__init__()
        self.sites, self.recipe = sites, recipe

    def rewrite(self, gm: GraphModule) -> int:
        return insert_site_qdq(gm, self.sites, self.recipe, ("q", "k", "v"), "fa")
