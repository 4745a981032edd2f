"""How ``torch.export`` (aten) graphs spell attention and Linears: the one table every finder and
rewriter matches through, so that no two of them can disagree on what attention looks like.

Attention spellings (``ATTENTION_SPELLINGS``), each an anchor op set and a matcher that returns the
roles of the match (q, k, v and the node whose value is the attention output):

1. ``sdpa``: one fused op, ``sdpa(q, k, v, mask?, ...)`` (``FUSED_ATTENTION``);
2. ``matmul-softmax-matmul``: ``matmul(q, k^T) -> [scale, mask, cast, ...] -> softmax -> [cast,
   dropout] -> matmul(p, v)``, the glue between the steps listed in ``SCORE_GLUE`` / ``PROB_GLUE``.

Linear spelling (``LINEAR``): ``aten.linear(x, weight, bias?)``.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from qpass.runtime import w8a8  # noqa: F401  (registers torch.ops.qpass.w8a8_linear)

aten = torch.ops.aten

FUSED_ATTENTION = frozenset(
    {
        aten.scaled_dot_product_attention.default,
        aten._scaled_dot_product_flash_attention_for_cpu.default,
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_flash_attention.default,
    }
)
SOFTMAX = frozenset({aten.softmax.int, aten._softmax.default, aten._safe_softmax.default})
MATMUL = frozenset({aten.matmul.default, aten.bmm.default})
SCORE_GLUE = frozenset(
    {
        aten.mul.Tensor,
        aten.div.Tensor,
        aten.add.Tensor,
        aten.to.dtype,
        aten._to_copy.default,
        aten.where.self,
        aten.masked_fill.Scalar,
        aten.masked_fill.Tensor,
        aten.tanh.default,
    }
)
PROB_GLUE = frozenset(
    {aten.to.dtype, aten._to_copy.default, aten.dropout.default, aten.clone.default, aten.alias.default}
)
TRANSPOSE = frozenset({aten.transpose.int})
CHECKS = frozenset({aten._assert_tensor_metadata.default})  # consume a value without using it
# Ops that only move, repeat or relabel values: GQA's repeat_kv (unsqueeze/slice -> expand -> reshape)
# and layout glue between the projection's head split and the attention op.
REPEAT_GLUE = frozenset(
    {
        aten.unsqueeze.default,
        aten.expand.default,
        aten.reshape.default,
        aten.view.default,
        aten._unsafe_view.default,
        aten.slice.Tensor,
        aten.alias.default,
        aten.clone.default,
        aten.contiguous.default,
    }
)
# Ops that relabel or move values without mixing channels of the last dim across positions.
LAYOUT = frozenset(
    {
        aten.view.default,
        aten.reshape.default,
        aten._unsafe_view.default,
        aten.transpose.int,
        aten.permute.default,
        aten.expand.default,
        aten.unsqueeze.default,
        aten.clone.default,
        aten.contiguous.default,
        aten.alias.default,
        aten.to.dtype,
        aten._to_copy.default,
    }
)
LINEAR = aten.linear.default
W8A8_LINEAR = torch.ops.qpass.w8a8_linear.default
W8A8_DYNAMIC_LINEAR = torch.ops.qpass.w8a8_dynamic_linear.default
# Where the backward walk from Q/K to its projection stops (an int8 Linear of a W8A8 model too).
PROJECTION = frozenset(
    {
        LINEAR,
        W8A8_LINEAR,
        W8A8_DYNAMIC_LINEAR,
        aten.addmm.default,
        aten.mm.default,
        aten.matmul.default,
        aten.bmm.default,
    }
)


@dataclass(frozen=True)
class AttentionMatch:
    spelling: str
    anchor: Node  # the fused op, or the softmax
    q: Node  # [B, H, S, D] as attention reads them (K/V after any GQA repeat)
    k: Node
    v: Node
    output: Node  # the attention output [B, H, S, D]: the fused op, or matmul(p, v)


def _match_fused(node: Node) -> AttentionMatch | None:
    q, k, v = node.args[:3]
    return AttentionMatch("sdpa", node, q, k, v, node)


def _match_matmul_softmax_matmul(softmax: Node) -> AttentionMatch | None:
    scores = walk_back(softmax.args[0], SCORE_GLUE, stop=lambda n: n.target in MATMUL)
    if scores is None or scores.target not in MATMUL:
        return None
    q, k_t = scores.args[:2]
    if not (isinstance(k_t, Node) and k_t.target in TRANSPOSE and _is_last_two_dims_swap(k_t)):
        return None
    probs = softmax
    while len(users := [u for u in probs.users if u.target not in CHECKS]) == 1:
        (user,) = users
        if user.target in MATMUL and user.args[0] is probs:
            return AttentionMatch("matmul-softmax-matmul", softmax, q, k_t.args[0], user.args[1], user)
        if user.target not in PROB_GLUE:
            return None
        probs = user
    return None


@dataclass(frozen=True)
class Spelling:
    name: str
    anchors: frozenset
    match: Callable[[Node], AttentionMatch | None]


ATTENTION_SPELLINGS = (
    Spelling("sdpa", FUSED_ATTENTION, _match_fused),
    Spelling("matmul-softmax-matmul", SOFTMAX, _match_matmul_softmax_matmul),
)


def match_attention(node: Node) -> AttentionMatch | None:
    """The attention ``node`` anchors, in any spelling, or None."""
    if node.op != "call_function":
        return None
    for spelling in ATTENTION_SPELLINGS:
        if node.target in spelling.anchors:
            return spelling.match(node)
    return None


def attention_matches(graph: Graph) -> list[AttentionMatch]:
    """Every attention of ``graph`` in execution order."""
    return [m for node in graph.nodes if (m := match_attention(node)) is not None]


def match_linear(node: Node) -> tuple[Node, Node, Node | None] | None:
    """``(x, weight, bias or None)`` of an ``aten.linear`` node, or None."""
    if node.target is not LINEAR:
        return None
    x, w, *rest = node.args
    return x, w, rest[0] if rest else None


def walk_back(x, glue: frozenset, stop) -> Node | None:
    """Follow the first 4-D tensor argument back through ``glue`` ops until ``stop(node)``."""
    node = x
    for _ in range(16):
        if not isinstance(node, Node):
            return None
        if stop(node):
            return node
        if node.target not in glue:
            return None
        node = next((a for a in node.args if isinstance(a, Node) and len(shape(a)) == 4), None)
    return None


def _is_last_two_dims_swap(node: Node) -> bool:
    rank = len(shape(node))
    dims = {d % rank for d in node.args[1:3]} if rank else set()
    return dims == {rank - 1, rank - 2}


def shape(x) -> tuple:
    val = x.meta.get("val") if isinstance(x, Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()
