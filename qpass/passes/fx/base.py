"""The one pass contract: a torch.fx pass that rewrites in place and counts what it rewrote.

``torch.fx.passes.infra``'s :class:`PassBase` / :class:`PassResult` carry it; a pass here implements
:meth:`CountingPass.rewrite`, which returns how many rewrites it made. ``modified`` follows from that
count (never a constant), and ``count`` is what the pipeline reports for every pass alike.
"""

import abc

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassBase, PassResult


class CountingPass(PassBase):
    """In place; ``self.count`` accumulates the rewrites of every call."""

    in_place = True

    def __init__(self):
        super().__init__()
        self.count = 0

    @abc.abstractmethod
    def rewrite(self, gm: GraphModule) -> int:
        """Rewrite ``gm`` in place; the number of rewrites made."""

    def call(self, gm: GraphModule) -> PassResult:
        n = self.rewrite(gm)
        self.count += n
        if n:
            gm.recompile()
        return PassResult(gm, n > 0)
