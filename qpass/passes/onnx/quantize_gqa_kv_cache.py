"""C8 on GroupQueryAttention graphs: ONNX Runtime's own int8 KV cache, with our per-channel scales.

The rewrite is the one onnxruntime-genai's builder makes with ``--extra_options
kv_cache_quant_scheme=int8_per_channel kv_cache_scale_file=...`` (checked against its output in
``tests/test_onnx_gqa.py``): on every ``com.microsoft.GroupQueryAttention`` node, attributes
``k_quant_type = v_quant_type = "PER_CHANNEL"`` and ``kv_cache_bit_width = 8``, float32 initializers
``[kv_num_heads * head_dim]`` at inputs 12 (``k_scale``) and 13 (``v_scale``), and int8 past/present cache
graph I/O ``[batch, kv_num_heads, seq, head_dim]``. The kernel quantizes what it appends
(``clamp(round_half_even(x / scale), -128, 127)``) and dequantizes on read; it has no zero point, so the cache
is symmetric only. With centres (an asymmetric recipe's zero points, ``-offset * scale``), K and V are
centred before the cache (:mod:`qpass.passes.onnx.gqa_centre`), which gives the symmetric cache the
asymmetric recipe's codes exactly. ``genai_config.json`` then needs ``search.past_present_share_buffer = false`` on CPU
(:func:`int8_kv_genai_config`).
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qpass.core.errors import QpassError
from qpass.passes.onnx.find_gqa_sites import (
    PAST_KEY,
    PAST_VALUE,
    PRESENT_KEY,
    PRESENT_VALUE,
    GQASite,
    const_input,
    find_gqa_sites,
    gqa_nodes,
)
from qpass.passes.onnx.gqa_centre import Positions, centre

K_SCALE, V_SCALE = 12, 13  # GroupQueryAttention's k_scale / v_scale inputs (onnxruntime 1.31 contrib schema)
QUANT_TYPE = "PER_CHANNEL"
BIT_WIDTH = 8
# consumers of a cache value other than its GQA node that do not care about its element type
_TYPE_BLIND = frozenset({("", "Shape"), ("", "Size")})


@dataclass(frozen=True)
class GQAKVScales:
    """One layer's per-channel int8 scales: ``k_scale``, ``v_scale`` ``[kv_num_heads * head_dim]`` float32,
    channel ``h * head_dim + d`` for KV head ``h``, dim ``d`` (``x ≈ q * scale``), and optional centres of the
    same shape (``x ≈ centre + q * scale``; None: the builder's plain symmetric cache)."""

    k_scale: np.ndarray
    v_scale: np.ndarray
    k_centre: np.ndarray | None = None
    v_centre: np.ndarray | None = None

    @classmethod
    def from_affine(cls, k: tuple, v: tuple, centred: bool) -> "GQAKVScales":
        """From a recipe's ``(scale, offset)`` per kind: centred at ``-offset * scale`` (the asymmetric
        recipe's codes) or, not ``centred``, the scales alone (a symmetric recipe's offsets are 0)."""

        def split(scale, offset):
            s, o = np.asarray(scale, dtype=np.float32), np.asarray(offset, dtype=np.float32)
            return s, ((-o * s).astype(np.float32) if centred else None)

        (k_scale, k_centre), (v_scale, v_centre) = split(*k), split(*v)
        return cls(k_scale, v_scale, k_centre, v_centre)

    @property
    def centred(self) -> bool:
        return self.k_centre is not None

    def __post_init__(self):
        if (self.k_centre is None) != (self.v_centre is None):
            raise QpassError("GQA centres: give both k_centre and v_centre, or neither")
        for key in ("k_centre", "v_centre"):
            raw = getattr(self, key)
            if raw is None:
                continue
            centre = np.asarray(raw).astype(np.float32)
            if (
                centre.shape != np.asarray(getattr(self, key.replace("centre", "scale"))).shape
                or not np.isfinite(centre).all()
            ):
                raise QpassError(
                    f"GQA {key}: shape {list(centre.shape)} or values do not fit; give one finite "
                    "centre per KV channel, the shape of its scale"
                )
            centre.setflags(write=False)
            object.__setattr__(self, key, centre)
        for key in ("k_scale", "v_scale"):
            raw = np.asarray(getattr(self, key))
            if raw.ndim != 1 or raw.size == 0:
                raise QpassError(
                    f"GQA {key}: shape {list(raw.shape)} is not [kv_num_heads * head_dim]; give one "
                    "scale per KV channel as a 1-D array"
                )
            scale = raw.astype(np.float32)
            bad = np.flatnonzero(~np.isfinite(scale) | (scale <= 0))
            if bad.size:
                raise QpassError(
                    f"GQA {key}: channel {int(bad[0])} is {float(raw[bad[0]])!r} ({bad.size} of "
                    f"{scale.size} channels are not finite and positive in float32); a symmetric int8 "
                    "scale is absmax / 127 > 0, so recalibrate or floor the scale at a small positive value"
                )
            scale.setflags(write=False)
            object.__setattr__(self, key, scale)


class QuantizeGQAKVCachePass(ir.passes.InPlacePass):
    """Give every GroupQueryAttention node of the main graph ONNX Runtime's int8 per-channel KV cache.

    ``scales[i]`` belongs to the i-th GQA node in execution order (:func:`find_gqa_sites`' ``layer``).
    All sites are checked before anything changes, so a refused model is left as it was. A graph without
    GQA nodes is refused (say so, rather than do nothing), and so is a node already quantized differently;
    a node that already carries exactly this cache is left alone, so ``modified`` is False on a second run.
    ``self.count`` counts the nodes this pass changed (over all calls), ``self.centred`` those of them whose K and V
    it centred.
    """

    def __init__(self, scales: Sequence[GQAKVScales]):
        super().__init__()
        self.scales = tuple(scales)
        self.count = self.centred = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        sites = find_gqa_sites(model)
        if not sites:
            raise QpassError(
                "no com.microsoft.GroupQueryAttention node in this graph; the GQA int8 KV cache "
                "applies to onnxruntime-genai models (use the QDQ C8 path for MatMul/Attention graphs)"
            )
        if len(self.scales) != len(sites):
            raise QpassError(
                f"GQA int8 KV cache: {len(self.scales)} layers of scales for {len(sites)} "
                "GroupQueryAttention nodes; give one (k_scale, v_scale) per node in execution order"
            )
        nodes = gqa_nodes(model.graph)
        todo = [
            (node, site, scales)
            for node, site, scales in zip(nodes, sites, self.scales, strict=True)
            if _check(model.graph, node, site, scales)
        ]
        positions = Positions(model.graph)
        for node, site, scales in todo:
            _rewrite(model.graph, node, site, scales)
            if scales.centred:
                centre(model.graph, node, site, scales.k_centre, scales.v_centre, positions)
                self.centred += 1
        self.count += len(todo)
        return ir.passes.PassResult(model, modified=bool(todo))


def _check(graph: ir.Graph, node: ir.Node, site: GQASite, scales: GQAKVScales) -> bool:
    """Whether ``node`` needs rewriting; QpassError where it cannot take this cache."""
    where = f"GQA layer {site.layer} ({site.node_name or 'unnamed'})"
    for key, scale in (("k_scale", scales.k_scale), ("v_scale", scales.v_scale)):
        if scale.size != site.kv_channels:
            raise QpassError(
                f"{where}: {key} has {scale.size} channels, expected kv_num_heads * head_dim = "
                f"{site.kv_num_heads} * {site.head_dim} = {site.kv_channels}"
            )
    for role, name in (
        ("past key", site.past_key),
        ("past value", site.past_value),
        ("present key", site.present_key),
        ("present value", site.present_value),
    ):
        if name is None:
            raise QpassError(
                f"{where}: its {role} is not wired to a graph input/output, so the cache cannot "
                "become int8 at the graph boundary; only decoder graphs with KV-cache I/O are supported"
            )
    for port, value in (
        (PAST_KEY, node.inputs[PAST_KEY]),
        (PAST_VALUE, node.inputs[PAST_VALUE]),
        (None, node.outputs[PRESENT_KEY]),
        (None, node.outputs[PRESENT_VALUE]),
    ):
        others = [use.node for use in value.uses() if not (use.node is node and use.idx == port)]
        blocking = [n for n in others if (n.domain, n.op_type) not in _TYPE_BLIND]
        if blocking:
            raise QpassError(
                f"{where}: cache value {value.name} is also read by {blocking[0].op_type} "
                f"({blocking[0].name}), which would see int8; only GroupQueryAttention may read it"
            )
    state = _quant_state(node)
    cache_types = {v.dtype for v in _cache_values(node)}
    if state == (None, None, None) and ir.DataType.INT8 not in cache_types:
        return True
    if (
        state == (QUANT_TYPE, QUANT_TYPE, BIT_WIDTH)
        and cache_types == {ir.DataType.INT8}
        and _same_scales(node, scales)
    ):
        return False
    raise QpassError(
        f"{where}: already has a quantized KV cache (k/v_quant_type, kv_cache_bit_width = {state}, "
        f"cache types {sorted(str(t) for t in cache_types)}); start from the float model"
    )


def _rewrite(graph: ir.Graph, node: ir.Node, site: GQASite, scales: GQAKVScales) -> None:
    node.attributes["k_quant_type"] = ir.AttrString("k_quant_type", QUANT_TYPE)
    node.attributes["v_quant_type"] = ir.AttrString("v_quant_type", QUANT_TYPE)
    node.attributes["kv_cache_bit_width"] = ir.AttrInt64("kv_cache_bit_width", BIT_WIDTH)
    if len(node.inputs) < V_SCALE + 1:
        node.resize_inputs(V_SCALE + 1)
    for port, key, scale in ((K_SCALE, "k_scale", scales.k_scale), (V_SCALE, "v_scale", scales.v_scale)):
        name = _free_name(graph, f"qpass.gqa.{site.layer}.{key}")
        value = ir.Value(
            name=name,
            type=ir.TensorType(ir.DataType.FLOAT),
            shape=ir.Shape([scale.size]),
            const_value=ir.tensor(scale, name=name),
        )
        graph.register_initializer(value)
        node.replace_input_with(port, value)
    for value in _cache_values(node):
        value.dtype = ir.DataType.INT8


def _cache_values(node: ir.Node) -> list[ir.Value]:
    return [node.inputs[PAST_KEY], node.inputs[PAST_VALUE], node.outputs[PRESENT_KEY], node.outputs[PRESENT_VALUE]]


def _quant_state(node: ir.Node) -> tuple:
    def get(key):
        attr = node.attributes.get(key)
        return None if attr is None else attr.value

    k, v, bits = get("k_quant_type"), get("v_quant_type"), get("kv_cache_bit_width")
    none = (None, "NONE")
    return (None if k in none else k, None if v in none else v, None if bits in (None, 0) else bits)


def _same_scales(node: ir.Node, scales: GQAKVScales) -> bool:
    k, v = const_input(node, K_SCALE), const_input(node, V_SCALE)
    return (
        k is not None
        and v is not None
        and np.array_equal(k.reshape(-1), scales.k_scale)
        and np.array_equal(v.reshape(-1), scales.v_scale)
    )


def _free_name(graph: ir.Graph, name: str) -> str:
    taken = (
        set(graph.initializers) | {v.name for v in graph.inputs} | {out.name for node in graph for out in node.outputs}
    )
    if name not in taken:
        return name
    i = 1
    while f"{name}.{i}" in taken:
        i += 1
    return f"{name}.{i}"


def int8_kv_genai_config(config: dict) -> dict:
    """A copy of ``genai_config.json``'s content for the int8 cache, as onnxruntime-genai 0.18's builder writes
    it for ``-e cpu --extra_options kv_cache_quant_scheme=int8_per_channel``: the only difference from its float
    config is ``search.past_present_share_buffer = false`` (the builder keeps a shared buffer for int8 on CUDA
    only); no cache dtype is written, the runtime takes it from the graph's cache inputs.
    """
    if "search" not in config or "model" not in config:
        raise QpassError("genai_config.json has no 'model' or 'search' section; is it onnxruntime-genai's config?")
    out = json.loads(json.dumps(config))
    out["search"]["past_present_share_buffer"] = False
    return out


def write_int8_kv_genai_config(src: Path, dst: Path) -> bool:
    """Write :func:`int8_kv_genai_config` of the JSON file ``src`` to ``dst`` (may be ``src``); whether it
    differs from ``src``."""
    try:
        config = json.loads(Path(src).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise QpassError(f"{src}: cannot read genai_config.json ({err}); give the directory the builder wrote") from err
    updated = int8_kv_genai_config(config)
    Path(dst).write_text(json.dumps(updated, indent=4) + "\n", encoding="utf-8")
    return updated != config
