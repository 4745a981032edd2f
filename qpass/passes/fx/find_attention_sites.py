"""Find every attention site in an exported graph from its ops and shapes alone.

A site names the graph values that qpass quantizes: Q, K and V after RoPE (K and V before GQA's
repeat, i.e. as they would be written to the KV cache), with the head counts read off their shapes
``q [B, H, S, D]``, ``k [B, H_kv, S, D]``, ``v [B, H_kv, S, D]``. Attention is matched through the
shared spelling table (:mod:`qpass.passes.fx.patterns`). Module and node names are never used to
decide anything; they only label the result (and give exporters the model's module names).
"""

from torch.fx import Graph, Node

from qpass.core.errors import QpassError
from qpass.core.sites import AttentionSite, module_prefix
from qpass.passes.fx.patterns import PROJECTION, REPEAT_GLUE, aten, attention_matches, shape


def find_attention_sites(graph: Graph, param_names: dict[str, str] | None = None) -> list[AttentionSite]:
    """Every attention site of ``graph`` in execution order (the order gives the layer index).

    ``param_names`` maps placeholder names to parameter names (``ExportedProgram.graph_signature.
    inputs_to_parameters``) so the site can say which weight feeds q, k and v.
    Raises ``QpassError`` when the graph has no attention, or an attention whose shapes qpass cannot
    handle.
    """
    param_names = param_names or {}
    sites = [_make_site(i, m, param_names) for i, m in enumerate(attention_matches(graph))]
    if not sites:
        raise QpassError(
            "no attention found in the graph: qpass looks for scaled_dot_product_attention or "
            "matmul-softmax-matmul over [B, H, S, D] tensors; check that MODEL is a decoder-only transformer"
        )
    return sites


def _make_site(layer, match, param_names) -> AttentionSite:
    attention, q, k, v = match.anchor, match.q, match.k, match.v
    q_shape, k_shape, v_shape = (shape(x) for x in (q, k, v))
    if len(q_shape) != 4 or len(k_shape) != 4 or len(v_shape) != 4:
        raise QpassError(
            f"attention {attention.name}: expected q, k, v shaped [B, H, S, D], got {q_shape}, {k_shape}, {v_shape}; "
            "qpass handles 4-D attention inputs only"
        )
    num_heads, head_dim = q_shape[1], q_shape[3]
    q_src = _before_repeat(q, num_heads, q_shape)
    k_src = _before_repeat(k, num_heads, k_shape)
    v_src = _before_repeat(v, num_heads, v_shape)
    num_kv_heads = shape(k_src)[1]
    if shape(v_src)[1] != num_kv_heads or shape(k_src)[3] != head_dim:
        raise QpassError(
            f"attention {attention.name}: k {shape(k_src)} and v {shape(v_src)} disagree on kv heads or head_dim; "
            "qpass needs K and V with the same [B, H_kv, S, D] layout"
        )
    q_cone, k_cone = _cone(q_src), _cone(k_src)
    q_from, k_from = _projection_param(q_cone, param_names), _projection_param(k_cone, param_names)
    v_from = _projection_param(_cone(v_src), param_names)
    return AttentionSite(
        layer=layer,
        attention=attention.name,
        form=match.spelling,
        q=q_src.name,
        k=k_src.name,
        v=v_src.name,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rope=_has_rope(q_cone) and _has_rope(k_cone),
        qk_norm=_has_norm(q_cone) and _has_norm(k_cone),
        q_from=q_from,
        k_from=k_from,
        v_from=v_from,
        prefix=module_prefix(q_from, k_from, v_from),
    )


def _before_repeat(x: Node, num_heads: int, x_shape: tuple) -> Node:
    """The deepest value behind ``x`` through repeat/layout glue still shaped ``[B, h, S, D]``, h | H.

    For GQA this undoes repeat_kv (``reshape(expand(unsqueeze(k)))``) and lands on K as the cache holds it.
    """
    batch, _, seq, dim = x_shape
    best = x
    node = x
    while isinstance(node, Node) and node.target in REPEAT_GLUE and isinstance(node.args[0], Node):
        node = node.args[0]
        s = shape(node)
        if len(s) < 4:
            break
        if len(s) == 4 and s[0] == batch and s[2] == seq and s[3] == dim and num_heads % s[1] == 0:
            best = node
    return best


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
                if arg.op == "placeholder" and arg.name in param_names and shape(arg) and len(shape(arg)) == 2:
                    return param_names[arg.name]
            return node.name
    return "?"
