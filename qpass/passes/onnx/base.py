"""The onnx-ir passes' one contract, as :mod:`qpass.passes.fx.base` is the torch.fx passes': in place, over the
attention sites with the recipe, counting what they rewrote. A pass implements :meth:`SitePass.rewrite`;
``modified`` follows from its count (never a constant), and ``count`` accumulates over calls for the pipeline."""

import abc

import onnx_ir as ir

from qpass.core.recipe import Recipe
from qpass.core.sites import AttentionSite
from qpass.passes.onnx.find_attention_sites import CacheIO

SITES_METADATA = "qpass.sites"  # the model metadata where a quantized model records its sites (JSON, FORMATS.md)


class SitePass(ir.passes.InPlacePass):
    def __init__(self, sites: list[tuple[AttentionSite, CacheIO | None]], recipe: Recipe):
        super().__init__()
        self.sites, self.recipe, self.count = sites, recipe, 0

    @abc.abstractmethod
    def rewrite(self, model: ir.Model) -> int:
        """Rewrite ``model`` in place; the number of rewrites made."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        n = self.rewrite(model)
        self.count += n
        return ir.passes.PassResult(model, n > 0)
