"""Find every attention site in an exported graph from its ops and shapes alone.

A site names the graph values that qpass quantizes: Q, K and V after RoPE (K and V before GQA's
repeat, i.e. as they would be written to the KV cache), with the head counts read off their shapes
``q [B, H, S, D]``, ``k [B, H_kv, S, D]``, ``v [B, H_kv, S, D]``. Module and node names are never
used to decide anything; they only label the result for humans.
"""

from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from qpass.errors import QpassError

aten = torch.ops.aten

# The ways exporters spell attention.
#  1. one fused op: sdpa(q, k, v, mask?, ...)
FUSED_ATTENTION = {
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_flash_attention.default,
}
#  2. matmul(q, k^T) -> [scale, mask, cast] -> softmax -> [cast, dropout] -> matmul(p, v)
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL = {aten.matmul.default, aten.bmm.default}
SCORE_GLUE = {aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.to.dtype, aten._to_copy.default,
              aten.where.self, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.tanh.default}
PROB_GLUE = {aten.to.dtype, aten._to_copy.default, aten.dropout.default, aten.clone.default, aten.alias.default}
TRANSPOSE = {aten.transpose.int}
CHECKS = {aten._assert_tensor_metadata.default}  # consume a value without using it
# Ops that only move, repeat or relabel values: GQA's repeat_kv (unsqueeze/slice -> expand -> reshape)
# and layout glue between the projection's head split and the attention op.
REPEAT_GLUE = {aten.unsqueeze.default, aten.expand.default, aten.reshape.default, aten.view.default,
               aten._unsafe_view.default, aten.slice.Tensor, aten.alias.default, aten.clone.default,
               aten.contiguous.default}
# Where the backward walk from Q/K to its projection stops.
PROJECTION = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default, aten.bmm.default}


@dataclass(frozen=True)
class AttentionSite:
    """One attention in the graph: the values to quantize (node names) and its head geometry."""

    layer: int
    attention: str   # the fused op, or the softmax of a matmul-softmax-matmul attention
    form: str        # "sdpa" or "matmul-softmax-matmul"
    q: str           # [B, H, S, D] after RoPE
    k: str           # [B, H_kv, S, D] after RoPE, before GQA repeat (what the KV cache holds)
    v: str           # [B, H_kv, S, D] before GQA repeat
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: bool
    qk_norm: bool
    q_from: str      # the parameter that projects Q (for humans: where q comes from)
    k_from: str
    v_from: str

    @property
    def gqa_group(self) -> int:
        return self.num_heads // self.num_kv_heads


def find_attention_sites(graph: Graph, param_names: dict[str, str] | None = None) -> list[AttentionSite]:
    """Every attention site of ``graph`` in execution order (the order gives the layer index).

    ``param_names`` maps placeholder names to parameter names (``ExportedProgram.graph_signature.
    inputs_to_parameters``) so the report can say which weight feeds q, k and v.
    Raises ``QpassError`` when the graph has no attention, or an attention whose shapes qpass cannot
    handle.
    """
    param_names = param_names or {}
    sites: list[AttentionSite] = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in FUSED_ATTENTION:
            q, k, v = node.args[:3]
            form = "sdpa"
        elif node.target in SOFTMAX:
            qkv = _match_matmul_softmax_matmul(node)
            if qkv is None:
                continue
            q, k, v = qkv
            form = "matmul-softmax-matmul"
        else:
            continue
        sites.append(_make_site(len(sites), node, form, q, k, v, param_names))
    if not sites:
        raise QpassError(
            "no attention found in the graph: qpass looks for scaled_dot_product_attention or "
            "matmul-softmax-matmul over [B, H, S, D] tensors; check that MODEL is a decoder-only transformer"
        )
    return sites


def _match_matmul_softmax_matmul(softmax: Node) -> tuple[Node, Node, Node] | None:
    """q, k, v of ``matmul(softmax(glue(matmul(q, k^T))), v)`` or None when ``softmax`` is not that."""
    scores = _walk_back(softmax.args[0], SCORE_GLUE, stop=lambda n: n.target in MATMUL)
    if scores is None or scores.target not in MATMUL:
        return None
    q, k_t = scores.args[:2]
    if not (isinstance(k_t, Node) and k_t.target in TRANSPOSE and _is_last_two_dims_swap(k_t)):
        return None
    probs = softmax
    while len(users := [u for u in probs.users if u.target not in CHECKS]) == 1:
        (user,) = users
        if user.target in MATMUL and user.args[0] is probs:
            return q, k_t.args[0], user.args[1]
        if user.target not in PROB_GLUE:
            return None
        probs = user
    return None


def _make_site(layer, attention, form, q, k, v, param_names) -> AttentionSite:
    q_shape, k_shape, v_shape = (_shape(x) for x in (q, k, v))
    if len(q_shape) != 4 or len(k_shape) != 4 or len(v_shape) != 4:
        raise QpassError(
            f"attention {attention.name}: expected q, k, v shaped [B, H, S, D], got {q_shape}, {k_shape}, {v_shape}; "
            "qpass handles 4-D attention inputs only"
        )
    num_heads, head_dim = q_shape[1], q_shape[3]
    q_src = _before_repeat(q, num_heads, q_shape)
    k_src = _before_repeat(k, num_heads, k_shape)
    v_src = _before_repeat(v, num_heads, v_shape)
    num_kv_heads = _shape(k_src)[1]
    if _shape(v_src)[1] != num_kv_heads or _shape(k_src)[3] != head_dim:
        raise QpassError(
            f"attention {attention.name}: k {_shape(k_src)} and v {_shape(v_src)} disagree on kv heads or head_dim; "
            "qpass needs K and V with the same [B, H_kv, S, D] layout"
        )
    q_cone, k_cone = _cone(q_src), _cone(k_src)
    return AttentionSite(
        layer=layer,
        attention=attention.name,
        form=form,
        q=q_src.name,
        k=k_src.name,
        v=v_src.name,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rope=_has_rope(q_cone) and _has_rope(k_cone),
        qk_norm=_has_norm(q_cone) and _has_norm(k_cone),
        q_from=_projection_param(q_cone, param_names),
        k_from=_projection_param(k_cone, param_names),
        v_from=_projection_param(_cone(v_src), param_names),
    )


def _before_repeat(x: Node, num_heads: int, shape: tuple) -> Node:
    """The deepest value behind ``x`` through repeat/layout glue still shaped ``[B, h, S, D]``, h | H.

    For GQA this undoes repeat_kv (``reshape(expand(unsqueeze(k)))``) and lands on K as the cache holds it.
    """
    batch, _, seq, dim = shape
    best = x
    node = x
    while isinstance(node, Node) and node.target in REPEAT_GLUE and isinstance(node.args[0], Node):
        node = node.args[0]
        s = _shape(node)
        if len(s) < 4:
            break
        if len(s) == 4 and s[0] == batch and s[2] == seq and s[3] == dim and num_heads % s[1] == 0:
            best = node
    return best


def _walk_back(x, glue: set, stop) -> Node | None:
    """Follow the first tensor argument back through ``glue`` ops until ``stop(node)``."""
    node = x
    for _ in range(16):
        if not isinstance(node, Node):
            return None
        if stop(node):
            return node
        if node.target not in glue:
            return None
        node = next((a for a in node.args if isinstance(a, Node) and len(_shape(a)) == 4), None)
    return None


def _cone(x: Node, limit: int = 64) -> list[Node]:
    """Nodes between ``x`` and the projections that feed it (breadth first, projections included)."""
    seen, frontier, out = {x}, [x], []
    while frontier and len(out) < limit:
        node = frontier.pop(0)
        out.append(node)
        if node.target in PROJECTION and node is not x:
            continue
        for arg in node.all_input_nodes:
            if arg not in seen and arg.op == "call_function":
                seen.add(arg)
                frontier.append(arg)
            elif arg not in seen:
                seen.add(arg)
                out.append(arg)
    return out


def _has_rope(cone: list[Node]) -> bool:
    """rotate_half: ``x * cos + cat(-x2, x1) * sin``; its signature is a neg feeding a cat."""
    return any(n.target is aten.cat.default and any(a.target is aten.neg.default for a in n.args[0]) for n in cone)


def _has_norm(cone: list[Node]) -> bool:
    """An RMS/layer norm between the projection and the attention input (QK-norm)."""
    return any(n.target in (aten.rsqrt.default, aten.layer_norm.default, aten.native_layer_norm.default) for n in cone)


def _projection_param(cone: list[Node], param_names: dict[str, str]) -> str:
    for node in cone:
        if node.target in PROJECTION:
            for arg in node.all_input_nodes:
                if arg.op == "placeholder" and arg.name in param_names and _shape(arg) and len(_shape(arg)) == 2:
                    return param_names[arg.name]
            return node.name
    return "?"


def _is_last_two_dims_swap(node: Node) -> bool:
    rank = len(_shape(node))
    dims = {d % rank for d in node.args[1:3]} if rank else set()
    return dims == {rank - 1, rank - 2}


def _shape(x) -> tuple:
    val = x.meta.get("val") if isinstance(x, Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()
