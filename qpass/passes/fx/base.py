"""The one pass contract: a torch.fx pass that rewrites in place and counts what it rewrote.

``torch.fx.passes.infra``'s :class:`PassBase` / :class:`PassResult` carry it; a pass here implements
:meth:`CountingPass.rewrite`, which returns how many rewrites it made. ``modified`` follows from that
count (never a constant), and ``count`` is what the pipeline reports for every pass alike.
"""

import abc

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassBase, PassResult


class CountingPass(PassBase):
    """In place; ``self.count`` accumulates the rewrites of every call.

    ``recompile``: whether the pass regenerates ``gm``'s Python code after rewriting. Off by default: the
    Q/DQ passes' graphs become a new program (:func:`qpass.frontends.torch_export.program.rebuild`), and a
    recompile of a 30-layer graph per pass made the passes 3x slower. A pass whose module is run
    afterwards as it is sets it.
    """

    in_place = True
    recompile = False

    def __init__(self):
        super().__init__()
        self.count = 0

    @abc.abstractmethod
    def rewrite(self, gm: GraphModule) -> int:
        """Rewrite ``gm`` in place; the number of rewrites made."""

    def call(self, gm: GraphModule) -> PassResult:
        n = self.rewrite(gm)
        self.count += n
        if n and self.recompile:
            gm.recompile()
        return PassResult(gm, n > 0)
