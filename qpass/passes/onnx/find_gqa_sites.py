"""Find ONNX Runtime's ``com.microsoft.GroupQueryAttention`` nodes and the KV-cache graph I/O they own.

onnxruntime-genai's model builder writes one such node per decoder layer, with packed QKV and RoPE fused
inside (``do_rotary``). Sites are found from the op type and the graph's wiring, never from node or value
names, so a renamed graph is found the same way.
"""

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qpass.core.errors import QpassError

GQA_DOMAIN = "com.microsoft"
GQA_OP = "GroupQueryAttention"
# GroupQueryAttention's input and output positions (onnxruntime 1.31 contrib schema)
QUERY, KEY, PAST_KEY, PAST_VALUE = 0, 1, 3, 4
PRESENT_KEY, PRESENT_VALUE = 1, 2


@dataclass(frozen=True)
class GQASite:
    """One GroupQueryAttention node and the cache it reads and writes.

    ``past_key``/``past_value`` name the graph inputs ``[batch, kv_num_heads, past_seq, head_dim]`` the node
    reads as its past cache, and ``present_key``/``present_value`` the graph outputs
    ``[batch, kv_num_heads, total_seq, head_dim]`` it writes; each is ``None`` where the node's port is empty or
    not wired straight to a graph input/output (a cache that cannot be made int8 at the graph boundary).
    ``layer`` is the node's position among the graph's GQA nodes in execution order, from 0.
    """

    layer: int
    node_name: str
    output: str  # the attention output the node makes (its first output)
    past_key: str | None
    past_value: str | None
    present_key: str | None
    present_value: str | None
    num_heads: int
    kv_num_heads: int
    head_dim: int
    do_rotary: bool
    packed_qkv: bool

    @property
    def kv_channels(self) -> int:
        """``kv_num_heads * head_dim``: the length of a per-channel K or V scale."""
        return self.kv_num_heads * self.head_dim


def is_gqa(node: ir.Node) -> bool:
    return node.op_type == GQA_OP and node.domain == GQA_DOMAIN


def gqa_nodes(graph: ir.Graph) -> list[ir.Node]:
    """The graph's GroupQueryAttention nodes in execution order.

    ONNX requires a graph's nodes to be stored in topological order, and the GQA nodes of a decoder each
    depend on the previous layer's output, so stored order is execution order.
    """
    return [node for node in graph if is_gqa(node)]


def find_gqa_sites(model: ir.Model) -> list[GQASite]:
    """One :class:`GQASite` per GroupQueryAttention node of ``model``'s main graph, in execution order.

    Empty when the graph has none. A node whose head_dim cannot be read from its cache or query shapes,
    or whose shapes disagree with its ``num_heads``/``kv_num_heads`` attributes, is a :class:`QpassError`.
    """
    return [_site(layer, node) for layer, node in enumerate(gqa_nodes(model.graph))]


def _site(layer: int, node: ir.Node) -> GQASite:
    name = node.name or f"GroupQueryAttention #{layer}"
    num_heads = _int_attr(node, "num_heads", name)
    kv_num_heads = _int_attr(node, "kv_num_heads", name)
    if num_heads % kv_num_heads:
        raise QpassError(
            f"{name}: num_heads {num_heads} is not a multiple of kv_num_heads {kv_num_heads}; "
            "this is not a valid GroupQueryAttention node"
        )
    packed = input_at(node, KEY) is None
    head_dim = _head_dim(node, name, num_heads, kv_num_heads, packed)
    return GQASite(
        layer=layer,
        node_name=node.name or "",
        output=node.outputs[0].name,
        past_key=_graph_input_name(input_at(node, PAST_KEY)),
        past_value=_graph_input_name(input_at(node, PAST_VALUE)),
        present_key=_graph_output_name(_output(node, PRESENT_KEY)),
        present_value=_graph_output_name(_output(node, PRESENT_VALUE)),
        num_heads=num_heads,
        kv_num_heads=kv_num_heads,
        head_dim=head_dim,
        do_rotary=attr_int(node, "do_rotary", 0) == 1,
        packed_qkv=packed,
    )


def _head_dim(node: ir.Node, name: str, num_heads: int, kv_num_heads: int, packed: bool) -> int:
    """head_dim from every shape that states it, which must agree.

    The caches ``[B, kv_num_heads, S, head_dim]`` state it directly when static (the builder leaves it
    symbolic, ``kv_cache_dim``); the query ``[B, S, num_heads * head_dim]`` (or packed
    ``(num_heads + 2 * kv_num_heads) * head_dim``) and the output ``[B, S, num_heads * head_dim]`` state it
    once divided by the head count.
    """
    candidates: dict[str, int] = {}
    for port in (PAST_KEY, PAST_VALUE):
        value = input_at(node, port)
        shape = value.shape if value is not None else None
        if shape is not None and len(shape) == 4:
            if isinstance(shape[1], int) and shape[1] != kv_num_heads:
                raise QpassError(
                    f"{name}: cache input {value.name} has {shape[1]} heads in its shape "
                    f"[batch, kv_heads, seq, head_dim] but kv_num_heads={kv_num_heads}"
                )
            if isinstance(shape[3], int):
                candidates[f"cache input {value.name}"] = shape[3]
    query = input_at(node, QUERY)
    heads = num_heads + 2 * kv_num_heads if packed else num_heads
    _divided(candidates, query, heads, f"query {query.name if query is not None else ''}")
    _divided(candidates, _output(node, 0), num_heads, "output")
    if not candidates:
        raise QpassError(
            f"{name}: head_dim is unknown (no static last dimension on its query, output or "
            "cache shapes); run onnx-ir's ShapeInferencePass first or give the cache inputs a static "
            "head_dim"
        )
    if len(set(candidates.values())) > 1:
        found = ", ".join(f"{where}: {dim}" for where, dim in candidates.items())
        raise QpassError(
            f"{name}: the shapes disagree on head_dim ({found}) for num_heads={num_heads}, kv_num_heads={kv_num_heads}"
        )
    return next(iter(candidates.values()))


def _divided(candidates: dict[str, int], value: ir.Value | None, heads: int, where: str) -> None:
    if value is None or value.shape is None or len(value.shape) != 3 or not isinstance(value.shape[2], int):
        return
    width = value.shape[2]
    if width % heads:
        raise QpassError(f"GroupQueryAttention {where}: last dimension {width} is not a multiple of {heads} heads")
    candidates[where] = width // heads


def input_at(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def const_input(node: ir.Node, index: int) -> np.ndarray | None:
    """The initializer wired to ``node``'s input ``index``, as an array; None where the input is absent or computed."""
    value = input_at(node, index)
    return None if value is None or value.const_value is None else value.const_value.numpy()


def _output(node: ir.Node, index: int) -> ir.Value | None:
    return node.outputs[index] if index < len(node.outputs) else None


def _graph_input_name(value: ir.Value | None) -> str | None:
    return value.name if value is not None and value.is_graph_input() else None


def _graph_output_name(value: ir.Value | None) -> str | None:
    return value.name if value is not None and value.is_graph_output() else None


def attr_int(node: ir.Node, key: str, default: int) -> int:
    attr = node.attributes.get(key)
    return default if attr is None else attr.as_int()


def _int_attr(node: ir.Node, key: str, name: str) -> int:
    value = attr_int(node, key, 0)
    if value <= 0:
        raise QpassError(
            f"{name}: attribute {key} is missing or not positive; GroupQueryAttention needs num_heads and kv_num_heads"
        )
    return value
