"""Per-channel QuantizeLinear / DequantizeLinear over ``[B, heads, S, head_dim]`` values, for any batch size.

The scales are per (head, dim): ``[heads * head_dim]``, channel ``c = h * head_dim + d``. ONNX's
per-axis form takes a 1-D scale along one axis, and (head, dim) are two axes; its blocked form
(opset 21) wants the scale's rank to equal the input's, so a ``[1, H, 1, D]`` scale only works for
batch 1 and one token. So the value is brought to ``[B, S, heads * head_dim]`` (Transpose, then
Reshape with explicit sizes, which also holds for an empty past where a ``-1`` could not be inferred),
quantized per axis 2, and brought back. The zero point is qpass's int8 offset: ONNX's
``y = saturate(round(x / scale) + zero_point)`` (round half to even) is qpass's formula.
"""

import numpy as np
import onnx_ir as ir
import torch

from qpass.core.errors import QpassError

CHANNEL_AXIS = 2  # of [B, S, heads * head_dim]
SWAP_HEADS_AND_SEQ = (0, 2, 1, 3)


def initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A constant registered as an initializer of ``graph`` (named ``name``)."""
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.Tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


def qparams(graph: ir.Graph, name: str, scale: torch.Tensor, offset: torch.Tensor) -> tuple[ir.Value, ir.Value]:
    """``(scale float32 [C], zero_point int8 [C])`` initializers from a recipe's tensors (checked finite, positive,
    in int8)."""
    s = scale.detach().double().flatten().numpy().astype(np.float32)
    z = offset.detach().flatten().numpy()
    if not np.isfinite(s).all() or (s <= 0).any() or (z < -128).any() or (z > 127).any() or (z != np.round(z)).any():
        raise QpassError(f"{name}: a scale that is not finite and positive, or an offset outside int8; recalibrate")
    return initializer(graph, f"{name}.scale", s), initializer(graph, f"{name}.zero_point", z.astype(np.int8))


def to_channels(graph: ir.Graph, x: ir.Value, heads: int, head_dim: int, tag: str) -> tuple[list[ir.Node], ir.Value]:
    """``[B, heads, S, head_dim]`` -> ``[B, S, heads * head_dim]``."""
    t = node("Transpose", [x], f"{tag}.to_channels.transpose", ir.AttrInt64s("perm", SWAP_HEADS_AND_SEQ))
    r = node("Reshape", [t.outputs[0], _shape(graph, [0, 0, heads * head_dim])], f"{tag}.to_channels.reshape")
    return [t, r], r.outputs[0]


def from_channels(graph: ir.Graph, x: ir.Value, heads: int, head_dim: int, tag: str) -> tuple[list[ir.Node], ir.Value]:
    """``[B, S, heads * head_dim]`` -> ``[B, heads, S, head_dim]``."""
    r = node("Reshape", [x, _shape(graph, [0, 0, heads, head_dim])], f"{tag}.from_channels.reshape")
    t = node("Transpose", [r.outputs[0]], f"{tag}.from_channels.transpose", ir.AttrInt64s("perm", SWAP_HEADS_AND_SEQ))
    return [r, t], t.outputs[0]


def quantize(graph: ir.Graph, x: ir.Value, scale: ir.Value, zero: ir.Value, heads: int, head_dim: int, tag: str):
    """int8 ``[B, heads, S, head_dim]`` from float ``x`` of that shape: ``(nodes, output)``."""
    pre, flat = to_channels(graph, x, heads, head_dim, f"{tag}.q")
    q = node("QuantizeLinear", [flat, scale, zero], f"{tag}.quantize", ir.AttrInt64("axis", CHANNEL_AXIS))
    post, out = from_channels(graph, q.outputs[0], heads, head_dim, f"{tag}.q")
    return [*pre, q, *post], out


def dequantize(graph: ir.Graph, x: ir.Value, scale: ir.Value, zero: ir.Value, heads: int, head_dim: int, tag: str):
    """float ``[B, heads, S, head_dim]`` from int8 ``x`` of that shape: ``(nodes, output)``."""
    pre, flat = to_channels(graph, x, heads, head_dim, f"{tag}.dq")
    dq = node("DequantizeLinear", [flat, scale, zero], f"{tag}.dequantize", ir.AttrInt64("axis", CHANNEL_AXIS))
    post, out = from_channels(graph, dq.outputs[0], heads, head_dim, f"{tag}.dq")
    return [*pre, dq, *post], out


def fake_quantize(graph: ir.Graph, x: ir.Value, scale: ir.Value, zero: ir.Value, heads: int, head_dim: int, tag: str):
    """``x`` through QuantizeLinear and DequantizeLinear (one layout change each way): ``(nodes, output)``."""
    pre, flat = to_channels(graph, x, heads, head_dim, tag)
    q = node("QuantizeLinear", [flat, scale, zero], f"{tag}.quantize", ir.AttrInt64("axis", CHANNEL_AXIS))
    dq = node("DequantizeLinear", [q.outputs[0], scale, zero], f"{tag}.dequantize", ir.AttrInt64("axis", CHANNEL_AXIS))
    post, out = from_channels(graph, dq.outputs[0], heads, head_dim, tag)
    return [*pre, q, dq, *post], out


def replace_uses(value: ir.Value, new: ir.Value, keep: set[ir.Node]) -> None:
    """Every use of ``value`` by a node outside ``keep`` reads ``new`` instead (graph outputs are left alone)."""
    for use in list(value.uses()):
        if use.node not in keep:
            use.node.replace_input_with(use.idx, new)


def named_values(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every named value of ``graph``: inputs, initializers and node outputs."""
    values = {v.name: v for v in graph.inputs}
    values.update(graph.initializers)
    for node in graph:
        values.update((v.name, v) for v in node.outputs)
    return values


def node(op_type: str, inputs: list[ir.Value], name: str, *attributes: ir.Attr) -> ir.Node:
    """A default-domain node with typed attributes (``ir.node``'s attribute type inference costs ~1 ms a node)."""
    return ir.Node("", op_type, inputs, attributes, name=name)


def _shape(graph: ir.Graph, dims: list[int]) -> ir.Value:
    """A shared int64 shape initializer (one per distinct shape in the graph)."""
    name = "qpass.shape." + "_".join(map(str, dims))
    existing = graph.initializers.get(name)
    return existing if existing is not None else initializer(graph, name, np.array(dims, dtype=np.int64))
