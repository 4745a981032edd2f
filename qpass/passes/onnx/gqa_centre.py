"""Centre K and V around their calibrated midpoints before GroupQueryAttention's int8 cache.

ONNX Runtime's int8 cache has a scale per channel and no zero point, so a channel whose values are not
centred on 0 wastes codes: RoPE'd keys of SmolLM2's low-frequency pairs sit 15-25% off centre. Subtracting
a per-channel centre ``c`` before the cache gives the symmetric cache an asymmetric range, and the model's
output is unchanged (before rounding):

- **V**: the attention weights of a query sum to 1, so ``softmax(.) (V - c_v) = out - c_v``; the centre is
  added back to GQA's output (each query head gets its KV head's centre).
- **K**: ``q . (k - c_k) = q . k - q . c_k``, the same shift for every key of a query, which softmax
  ignores. The shift must hold *after* RoPE, where the cache is written. GQA rotates what it is given
  (``do_rotary``), so the centre is rotated back to each token's position first: GQA receives
  ``k - R(-p) c_k`` and caches ``R(p) k - c_k``. ``R(-p)`` is ``com.microsoft.RotaryEmbedding`` with the
  sine table negated, and the positions ``p`` are GQA's own: ``position_ids`` where the node has them, else
  ``0 .. S-1`` on the first prompt (``S == total_sequence_length``) and ``seqlens_k + 1 - S + s`` after it.

With the centre ``c = -offset * scale`` of an asymmetric recipe, the cached codes ``round((x - c) / scale)``
are exactly the asymmetric codes ``round(x / scale) + offset``: the zero point moves into the graph.
``tests/test_onnx_gqa.py`` checks that the centred float model gives the original's logits in prefill,
chunked prefill, decode and a padded batch.
"""

import numpy as np
import onnx_ir as ir
import torch

from qpass.core.errors import QpassError
from qpass.passes.onnx.find_gqa_sites import QUERY, GQASite, attr_int, const_input, gqa_nodes, input_at
from qpass.passes.onnx.qdq import initializer, node, replace_uses

SEQLENS_K, TOTAL_SEQUENCE_LENGTH, COS_CACHE, SIN_CACHE, POSITION_IDS = 5, 6, 7, 8, 9
MS = "com.microsoft"
TABLE_TOLERANCE = 1e-2  # a cos/sin table entry may differ this much from cos/sin(p * frequency) (float32, fp16 tables)


def rotary_frequencies(model: ir.Model) -> torch.Tensor | None:
    """The RoPE frequencies ``[r / 2]`` (float64) that every GroupQueryAttention node of ``model`` turns K by, read
    from its ``cos_cache`` / ``sin_cache`` ``[positions, r / 2]`` (row p holds ``cos`` / ``sin`` of ``p * frequency``:
    the frequency is the angle of row 1), for ``--max-context``. None where qpass cannot say: no GroupQueryAttention
    node, one without ``do_rotary`` or with the interleaved layout, tables that are not constants or not the same
    for every layer (Gemma 3's two RoPEs), or not ``p * frequency`` at every position (a scaling that changes with
    the position)."""
    tables = []
    for gqa in gqa_nodes(model.graph):
        if attr_int(gqa, "do_rotary", 0) != 1 or attr_int(gqa, "rotary_interleaved", 0) != 0:
            return None
        table = (const_input(gqa, COS_CACHE), const_input(gqa, SIN_CACHE))
        if table[0] is None or table[1] is None:
            return None
        tables.append(table)
    if not tables or any(not np.array_equal(t, first) for table in tables[1:] for t, first in zip(table, tables[0])):
        return None  # none, or layers of other tables
    cos, sin = (t.astype(np.float64) for t in tables[0])
    if cos.ndim != 2 or cos.shape != sin.shape or cos.shape[0] < 2:
        return None
    frequencies = np.arctan2(sin[1], cos[1])
    angles = np.arange(cos.shape[0], dtype=np.float64)[:, None] * frequencies[None, :]
    if max(np.abs(np.cos(angles) - cos).max(), np.abs(np.sin(angles) - sin).max()) > TABLE_TOLERANCE:
        return None
    return torch.from_numpy(frequencies)


class Positions:
    """The ``[B, S]`` int64 positions GQA rotates by, built once per (seqlens_k, total_sequence_length) pair
    and shared by every layer that reads the same pair, with one negated sine table per table."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self._positions: dict[tuple, ir.Value] = {}
        self._neg_sin: dict[int, ir.Value] = {}

    def of(self, gqa: ir.Node, query: ir.Value) -> ir.Value:
        given = input_at(gqa, POSITION_IDS)
        if given is not None:
            return given
        seqlens, total = input_at(gqa, SEQLENS_K), input_at(gqa, TOTAL_SEQUENCE_LENGTH)
        key = (id(seqlens), id(total))
        if key not in self._positions:
            self._positions[key] = self._build(gqa, query, seqlens, total)
        return self._positions[key]

    def neg_sin(self, gqa: ir.Node, sin: ir.Value) -> ir.Value:
        if id(sin) not in self._neg_sin:
            neg = node("Neg", [sin], f"qpass.gqa.neg_sin.{len(self._neg_sin)}")
            self.graph.insert_before(gqa, [neg])
            self._neg_sin[id(sin)] = neg.outputs[0]
        return self._neg_sin[id(sin)]

    def _build(self, gqa: ir.Node, query: ir.Value, seqlens: ir.Value, total: ir.Value) -> ir.Value:
        tag = f"qpass.gqa.positions.{len(self._positions)}"
        i64 = ir.AttrInt64("to", ir.DataType.INT64)
        zero, one, axis0, axis1 = (
            initializer(self.graph, f"{tag}.{n}", np.array(v, dtype=np.int64))
            for n, v in (("zero", 0), ("one", 1), ("axis0", [0]), ("axis1", [1]))
        )
        seq = node("Shape", [query], f"{tag}.seq", ir.AttrInt64("start", 1), ir.AttrInt64("end", 2))  # [1]
        seq_scalar = node("Squeeze", [seq.outputs[0], axis0], f"{tag}.seq_scalar")
        steps = node("Range", [zero, seq_scalar.outputs[0], one], f"{tag}.steps")  # [S]: 0 .. S-1
        total64 = node("Cast", [total], f"{tag}.total", i64)
        first = node("Equal", [total64.outputs[0], seq.outputs[0]], f"{tag}.first")  # the first prompt
        seqlens64 = node("Cast", [seqlens], f"{tag}.seqlens", i64)  # [B]: total length - 1 per row
        past = node("Sub", [seqlens64.outputs[0], seq.outputs[0]], f"{tag}.past_minus_one")
        start = node("Add", [past.outputs[0], one], f"{tag}.start")
        start_col = node("Unsqueeze", [start.outputs[0], axis1], f"{tag}.start_col")  # [B, 1]
        later = node("Add", [start_col.outputs[0], steps.outputs[0]], f"{tag}.later")  # [B, S]
        positions = node("Where", [first.outputs[0], steps.outputs[0], later.outputs[0]], f"{tag}.ids")
        nodes = [seq, seq_scalar, steps, total64, first, seqlens64, past, start, start_col, later, positions]
        self.graph.insert_before(gqa, nodes)
        return positions.outputs[0]


def centre(
    graph: ir.Graph, gqa: ir.Node, site: GQASite, k_centre: np.ndarray, v_centre: np.ndarray, positions: Positions
) -> None:
    """Rewrite ``gqa``'s inputs to ``k - R(-p) k_centre`` and ``v - v_centre`` and add ``v_centre`` back to its
    output (module docstring). ``k_centre``/``v_centre`` are float32 ``[kv_num_heads * head_dim]``."""
    tag = f"qpass.gqa.{site.layer}.centre"
    kv, d, group = site.kv_channels, site.head_dim, site.num_heads // site.kv_num_heads
    query = gqa.inputs[QUERY]
    if site.packed_qkv:
        sizes = initializer(graph, f"{tag}.split", np.array([site.num_heads * d, kv, kv], dtype=np.int64))
        split = ir.Node("", "Split", [query, sizes], [ir.AttrInt64("axis", -1)], name=f"{tag}.split", num_outputs=3)
        graph.insert_before(gqa, [split])
        q, k, v = split.outputs
    else:
        split, (q, k, v) = None, (gqa.inputs[QUERY], gqa.inputs[1], gqa.inputs[2])
    k_c = initializer(graph, f"{tag}.k", k_centre.reshape(1, 1, kv).astype(np.float32))
    v_c = initializer(graph, f"{tag}.v", v_centre.reshape(1, 1, kv).astype(np.float32))
    nodes = []
    if site.do_rotary:
        cos, sin = input_at(gqa, COS_CACHE), input_at(gqa, SIN_CACHE)
        if cos is None or sin is None:
            raise QpassError(
                f"GQA layer {site.layer}: do_rotary is set but cos_cache/sin_cache are not wired; "
                "this GroupQueryAttention node cannot run"
            )
        pos = positions.of(gqa, query)  # the query, packed or not, gives S
        neg_sin = positions.neg_sin(gqa, sin)
        k_shape = node("Shape", [k], f"{tag}.k_shape")
        wide = node("Expand", [k_c, k_shape.outputs[0]], f"{tag}.k_wide")  # [B, S, kv * head_dim]
        attrs = [
            ir.AttrInt64("interleaved", attr_int(gqa, "rotary_interleaved", 0)),
            ir.AttrInt64("num_heads", site.kv_num_heads),
        ]
        rotary_dim = _rotary_dim(cos, d)
        if rotary_dim is not None:
            attrs.append(ir.AttrInt64("rotary_embedding_dim", rotary_dim))
        back = ir.Node(MS, "RotaryEmbedding", [wide.outputs[0], pos, cos, neg_sin], attrs, name=f"{tag}.k_unrotate")
        k_shift = back.outputs[0]
        nodes += [k_shape, wide, back]
    else:
        k_shift = k_c
    k_new = node("Sub", [k, k_shift], f"{tag}.k_sub")
    v_new = node("Sub", [v, v_c], f"{tag}.v_sub")
    nodes += [k_new, v_new]
    graph.insert_before(gqa, nodes)
    if split is not None:
        gqa.replace_input_with(QUERY, q)
    gqa.replace_input_with(1, k_new.outputs[0])
    gqa.replace_input_with(2, v_new.outputs[0])
    per_head = np.repeat(v_centre.astype(np.float32).reshape(site.kv_num_heads, 1, d), group, axis=1)
    o_c = initializer(graph, f"{tag}.out", per_head.reshape(1, 1, site.num_heads * d))
    out = gqa.outputs[0]
    add = node("Add", [out, o_c], f"{tag}.out_add")
    graph.insert_after(gqa, [add])
    replace_uses(out, add.outputs[0], keep={add})
    if out.is_graph_output():
        outputs = graph.outputs
        outputs[outputs.index(out)] = add.outputs[0]
        add.outputs[0].name, out.name = out.name, f"{out.name}.uncentred"


def _rotary_dim(cos: ir.Value, head_dim: int) -> int | None:
    """``rotary_embedding_dim`` for a partial rotary (cos table narrower than head_dim / 2), else None."""
    shape = cos.shape
    if shape is None or len(shape) != 2 or not isinstance(shape[1], int):
        return None
    return 2 * shape[1] if 2 * shape[1] < head_dim else None
