"""Checks run after every pass (and by ``--verify``): the graph is well formed and our invariants hold."""

import torch
from torch.fx import GraphModule

from qpass.passes.qdq import DEQUANTIZE, QUANTIZE


class VerificationError(AssertionError):
    """A pass left the graph in a state that breaks an invariant: a bug in qpass, not in the input."""


def verify_graph(gm: GraphModule) -> None:
    """``graph.lint()``, and every Quantize is followed by Dequantize with the same float32 scale/offset,
    both constants with ``meta["val"]`` that broadcast against the quantized value."""
    gm.graph.lint()
    for node in gm.graph.nodes:
        if node.target is not QUANTIZE:
            continue
        x, scale, offset = node.args
        for const in (scale, offset):
            val = _constant(gm, const)
            if val is None or val.dtype != torch.float32:
                raise VerificationError(f"{node.name}: scale/offset {const} is not a float32 constant")
            try:
                torch.broadcast_shapes(tuple(val.shape), tuple(x.meta["val"].shape))
            except RuntimeError:
                raise VerificationError(f"{node.name}: {const} shape {tuple(val.shape)} does not broadcast to {tuple(x.meta['val'].shape)}") from None
        if "val" not in node.meta or node.meta["val"].dtype != torch.int8:
            raise VerificationError(f"{node.name}: quantize output is not int8")
        users = list(node.users)
        if not users or any(u.target is not DEQUANTIZE or u.args[1:3] != (scale, offset) for u in users):
            raise VerificationError(f"{node.name}: int8 value is not read back by a dequantize with its own scale/offset")


def _constant(gm: GraphModule, node):
    if node.op == "get_attr":
        return getattr(gm, node.target, None)
    return node.meta.get("val")  # lifted constant placeholder
