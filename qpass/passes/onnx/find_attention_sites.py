"""Find every attention site of an ONNX decoder by structure, with onnxscript's pattern matcher.

Two spellings are declared (``ATTENTION_PATTERNS``): the ONNX ``Attention`` op (opset 23), and
``MatMul(q, k^T) -> [Mul|Div scale] -> [Add mask] -> Softmax -> [Where(IsNaN)] -> MatMul(., v)``, the
form ``torch.onnx.export(dynamo=True)`` writes at opsets 18-20 (the optional steps are ``OrValue``
alternatives). K and V are then followed back through the head repeat (``Unsqueeze -> Expand ->
Reshape``), transposes and scalar scalings to the ``Concat`` with the past cache: the site's ``k``/``v``
are that Concat's new-token input ``[B, kv_heads, S, head_dim]`` (after RoPE, before the repeat), and
its :class:`CacheIO` names the ``past_key_values.*`` input and ``present.*`` output. Head counts come
from the cache inputs' shapes (``[B, kv_heads, past, head_dim]``) and q's shape (``[B, heads, S, head_dim]``),
so the graph must carry shapes (run onnx-ir's ``ShapeInferencePass`` first).
"""

from dataclasses import dataclass

import onnx_ir as ir
from onnxscript.rewriter import pattern

from qpass.core.errors import QpassError
from qpass.core.sites import AttentionSite

# ops K and V pass through between the cache Concat and attention: the head repeat and layout changes
LAYOUT_OPS = frozenset({"Reshape", "Expand", "Unsqueeze", "Squeeze", "Transpose", "Identity"})


@dataclass(frozen=True)
class CacheIO:
    """One layer's KV cache as graph I/O: ``present_key = Concat(past_key, new k, axis=-2)``, and V's alike."""

    past_key: str
    past_value: str
    present_key: str
    present_value: str


def _matmul_attention(op, q, k, v, scale, mask, fill):
    scores = op.MatMul(q, k)
    scaled = pattern.OrValue([op.Mul(scores, scale), op.Div(scores, scale), scores], tag_var="scaling")
    masked = pattern.OrValue([op.Add(scaled, mask), scaled], tag_var="masking")
    probs = op.Softmax(masked)
    guarded = pattern.OrValue([op.Where(op.IsNaN(probs), fill, probs), probs], tag_var="nan_guard")
    return op.MatMul(guarded, v)


def _onnx_attention(op, q, k, v):
    return op.Attention(q, k, v, _allow_other_inputs=True, _allow_other_attributes=True)


ATTENTION_PATTERNS = {
    "matmul-softmax-matmul": pattern.Pattern(_matmul_attention, name="matmul-softmax-matmul"),
    "onnx-attention": pattern.Pattern(_onnx_attention, name="onnx-attention"),
}


def find_attention_sites(
    model: ir.Model, tracer: pattern.MatchingTracer | None = None
) -> list[tuple[AttentionSite, CacheIO | None]]:
    """Every attention of ``model``'s main graph in execution order, with its KV cache I/O (None when the graph
    has none). ``tracer`` (onnxscript's ``MatchingTracer``) records the closest misses, to explain a graph
    where nothing matched."""
    graph, found = model.graph, []
    graph_inputs, graph_outputs = set(graph.inputs), set(graph.outputs)
    for node in graph:
        for form, rule in ATTENTION_PATTERNS.items():
            match = rule.match(model, graph, node, check_nodes_are_removable=False, tracer=tracer)
            if not match:
                continue
            q, k, v = (match.bindings[name] for name in ("q", "k", "v"))
            found.append(_site(len(found), node, form, _unscaled(q), k, v, graph_inputs, graph_outputs))
            break
    return found


def _site(
    layer: int, node: ir.Node, form: str, q: ir.Value, k: ir.Value, v: ir.Value, graph_inputs: set, graph_outputs: set
) -> tuple[AttentionSite, CacheIO | None]:
    where = f"attention {layer} ({node.name or node.outputs[0].name})"
    k_new, k_concat = _before_repeat(k, graph_inputs, graph_outputs)
    v_new, v_concat = _before_repeat(v, graph_inputs, graph_outputs)
    cache = None
    if k_concat is not None and v_concat is not None:
        cache = CacheIO(
            k_concat.inputs[0].name, v_concat.inputs[0].name, k_concat.outputs[0].name, v_concat.outputs[0].name
        )
        kv_shape = k_concat.inputs[0].shape
    else:
        kv_shape = k_new.shape
    if q.shape is None or len(q.shape) != 4 or kv_shape is None or len(kv_shape) != 4:
        raise QpassError(
            f"{where}: q and k must be 4-D [batch, heads, seq, head_dim] with known shapes "
            f"(q {q.shape}, k {kv_shape}); "
            "export the model with 4-D attention inputs"
        )
    heads, head_dim, kv_heads = q.shape[1], q.shape[3], kv_shape[1]
    if not all(isinstance(d, int) for d in (heads, head_dim, kv_heads)) or kv_shape[3] != head_dim or heads % kv_heads:
        raise QpassError(
            f"{where}: cannot read static head counts from q {q.shape} and the cache {kv_shape}; "
            "export with static head counts"
        )
    site = AttentionSite(
        layer=layer,
        attention=node.outputs[0].name,
        form=form,
        q=q.name,
        k=k_new.name,
        v=v_new.name,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rope=_has_rope(q),
        qk_norm=False,
        q_from="?",
        k_from="?",
        v_from="?",
    )
    return site, cache


def _unscaled(q: ir.Value) -> ir.Value:
    """``q`` before a scalar softmax-scale ``Mul``/``Div`` (its ``[B, H, S, D]`` value after RoPE)."""
    producer = q.producer()
    while producer is not None and producer.op_type in ("Mul", "Div") and _is_scalar_constant(producer.inputs[1]):
        q = producer.inputs[0]
        producer = q.producer()
    return q


def _before_repeat(value: ir.Value, graph_inputs: set, graph_outputs: set) -> tuple[ir.Value, ir.Node | None]:
    """Follow ``value`` back through layout ops and scalar scalings. Returns ``(the new-token K/V, the cache
    Concat)`` when it reaches ``Concat(past graph input, new)`` whose output is a graph output; otherwise
    ``(the first value that is not a layout change, None)``."""
    while (producer := value.producer()) is not None:
        if (
            producer.op_type == "Concat"
            and len(producer.inputs) == 2
            and producer.inputs[0] in graph_inputs
            and producer.outputs[0] in graph_outputs
        ):
            return producer.inputs[1], producer
        if producer.op_type in LAYOUT_OPS or (
            producer.op_type in ("Mul", "Div") and _is_scalar_constant(producer.inputs[1])
        ):
            value = producer.inputs[0]
            continue
        break
    return value, None


def _is_scalar_constant(value: ir.Value | None) -> bool:
    if value is None:
        return False
    tensor = ir.convenience.get_const_tensor(value)
    return tensor is not None and tensor.size == 1


def _has_rope(q: ir.Value) -> bool:
    """Whether q comes from a rotary embedding: the ``RotaryEmbedding`` op, or ``x*cos + rotate(x)*sin``."""
    producer = q.producer()
    if producer is None:
        return False
    if producer.op_type == "RotaryEmbedding":
        return True
    return producer.op_type == "Add" and all(
        i is not None and i.producer() is not None and i.producer().op_type == "Mul" for i in producer.inputs
    )
