"""C8: Quantize/Dequantize on K and V where they are written to the KV cache, per channel."""

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from qpass.passes.find_attention_sites import AttentionSite
from qpass.passes.qdq import insert_site_qdq
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
        count = insert_site_qdq(gm, self.sites, self.recipe, ("k", "v"), "kv")
        self.inserted += count
        return PassResult(gm, count > 0)
