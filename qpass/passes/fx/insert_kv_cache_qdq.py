"""C8: Quantize/Dequantize on K and V where they are written to the KV cache, per channel."""

from torch.fx import GraphModule

from qpass.core.recipe import Recipe
from qpass.core.sites import AttentionSite
from qpass.passes.fx.base import CountingPass
from qpass.passes.fx.qdq import insert_site_qdq


class InsertKVCacheQDQPass(CountingPass):
    """Insert Q/DQ with the recipe's ``kv_k``/``kv_v`` scales (``[kv_heads * head_dim]``); counts the pairs.

    The site's k and v are the values before GQA's repeat, i.e. what a KV cache stores.
    """

    def __init__(self, sites: list[AttentionSite], recipe: Recipe):
        super().__init__()
        self.sites, self.recipe = sites, recipe

    def rewrite(self, gm: GraphModule) -> int:
        return insert_site_qdq(gm, self.sites, self.recipe, ("k", "v"), "kv")
