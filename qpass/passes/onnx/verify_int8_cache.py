"""qpass's own invariant on a rewritten ONNX decoder: every int8 cache output is written with its scale.

A ``present.*`` output that is int8 must come from ``Concat(int8 past, QuantizeLinear(new) [through the layout
change])`` with a constant scale per KV channel (``kv_heads * head_dim``: the QDQ form, C8's or FAQuant's), or
from a GroupQueryAttention node set to its 8-bit cache with ``k_scale``/``v_scale`` wired (ONNX Runtime's own
form). ``onnx.checker`` cannot see this: an int8 cache fed from anything else is a well-formed graph.
"""

import onnx_ir as ir

from qpass.core.errors import QpassError
from qpass.core.sites import AttentionSite
from qpass.passes.onnx.find_attention_sites import CacheIO
from qpass.passes.onnx.find_gqa_sites import is_gqa
from qpass.passes.onnx.quantize_gqa_kv_cache import V_SCALE


class VerifyInt8CachePass(ir.passes.PassBase):
    """Raises :class:`QpassError` naming the first int8 cache output written without its quantization; never
    changes the model."""

    in_place = True
    changes_input = False

    def __init__(self, sites: list[tuple[AttentionSite, CacheIO | None]]):
        super().__init__()
        self.sites = sites

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        outputs = {v.name: v for v in model.graph.outputs}
        for site, cache in self.sites:
            for present in () if cache is None else (cache.present_key, cache.present_value):
                value = outputs.get(present)
                channels = site.num_kv_heads * site.head_dim
                if value is not None and value.dtype == ir.DataType.INT8 and not _quantized_write(value, channels):
                    raise QpassError(
                        f"the rewritten ONNX model writes the int8 cache {present} without its quantization; "
                        "please report this model"
                    )
        return ir.passes.PassResult(model, False)


def _quantized_write(value: ir.Value, channels: int) -> bool:
    node = value.producer()
    if node is None:
        return False
    if is_gqa(node):
        bits = node.attributes.get("kv_cache_bit_width")
        return (
            bits is not None and bits.as_int() == 8 and len(node.inputs) > V_SCALE and node.inputs[V_SCALE] is not None
        )
    if node.op_type != "Concat" or len(node.inputs) != 2 or node.inputs[0].dtype != ir.DataType.INT8:
        return False
    new = node.inputs[1].producer()
    while new is not None and new.op_type in ("Transpose", "Reshape"):
        new = new.inputs[0].producer()
    if new is None or new.op_type != "QuantizeLinear" or len(new.inputs) < 2:
        return False
    scale = ir.convenience.get_const_tensor(new.inputs[1]) if new.inputs[1] is not None else None
    return scale is not None and scale.size == channels
