"""Checks run after every pass (and by ``--verify``): the graph is well formed and our invariants hold."""

import torch
from torch.fx import GraphModule

from qpass.passes.fx.patterns import W8A8_DYNAMIC_LINEAR, W8A8_LINEAR
from qpass.passes.fx.qdq import DEQUANTIZE, FAKE_QUANT_DYNAMIC, QUANTIZE


class VerificationError(AssertionError):
    """A pass left the graph in a state that breaks an invariant: a bug in qpass, not in the input."""


def verify_graph(gm: GraphModule) -> None:
    """``graph.lint()``; every Quantize is followed by Dequantize with the same float32 scale/offset,
    both constants that broadcast against the quantized value; every dynamic fake quant keeps its input's
    ``[B, H_kv, S, D]`` float shape and dtype; every W8A8 Linear is well formed."""
    gm.graph.lint()
    verify_w8a8(gm)
    for node in gm.graph.find_nodes(op="call_function", target=FAKE_QUANT_DYNAMIC):
        x, out = node.args[0].meta.get("val"), node.meta.get("val")
        if (
            x is None
            or out is None
            or x.dim() != 4
            or not x.is_floating_point()
            or (out.shape, out.dtype) != (x.shape, x.dtype)
        ):
            raise VerificationError(
                f"{node.name}: the dynamic fake quant does not map a float [B, H_kv, S, D] value "
                "to its own shape and dtype"
            )
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
                raise VerificationError(
                    f"{node.name}: {const} shape {tuple(val.shape)} does not broadcast to {tuple(x.meta['val'].shape)}"
                ) from None
        if "val" not in node.meta or node.meta["val"].dtype != torch.int8:
            raise VerificationError(f"{node.name}: quantize output is not int8")
        users = list(node.users)
        if not users or any(u.target is not DEQUANTIZE or u.args[1:3] != (scale, offset) for u in users):
            raise VerificationError(
                f"{node.name}: int8 value is not read back by a dequantize with its own scale/offset"
            )


def verify_w8a8(gm: GraphModule) -> None:
    """Every ``w8a8_linear`` reads constants of the right dtypes and shapes: int8 ``[n, k]`` weight,
    int32 ``[n]`` quant_bias, float32 ``[n]`` deq_scale, float32 ``[1]`` input scale and offset; every
    ``w8a8_dynamic_linear`` an int8 ``[n, k]`` weight, float32 ``[n]`` weight scale and bias."""
    for node in gm.graph.find_nodes(op="call_function", target=W8A8_LINEAR):
        x, scale, offset, weight, qbias, deq = (_constant(gm, a) for a in node.args)
        for val, dtype in (
            (scale, torch.float32),
            (offset, torch.float32),
            (weight, torch.int8),
            (qbias, torch.int32),
            (deq, torch.float32),
        ):
            if val is None or val.dtype != dtype:
                raise VerificationError(
                    f"{node.name}: a w8a8_linear constant is {None if val is None else val.dtype}, not {dtype}"
                )
        n, k = weight.shape
        if (
            tuple(scale.shape) != (1,)
            or tuple(offset.shape) != (1,)
            or tuple(qbias.shape) != (n,)
            or tuple(deq.shape) != (n,)
        ):
            raise VerificationError(
                f"{node.name}: w8a8_linear constant shapes {tuple(scale.shape)}, {tuple(offset.shape)}, "
                f"{tuple(qbias.shape)}, {tuple(deq.shape)} do not fit weight [{n}, {k}]"
            )
        if x.shape[-1] != k:
            raise VerificationError(f"{node.name}: input [..., {x.shape[-1]}] does not fit weight [{n}, {k}]")

    for node in gm.graph.find_nodes(op="call_function", target=W8A8_DYNAMIC_LINEAR):
        x, weight, w_scale, bias = (_constant(gm, a) for a in node.args)
        for val, dtype in ((weight, torch.int8), (w_scale, torch.float32), (bias, torch.float32)):
            if val is None or val.dtype != dtype:
                raise VerificationError(
                    f"{node.name}: a w8a8_dynamic_linear constant is {None if val is None else val.dtype}, not {dtype}"
                )
        n, k = weight.shape
        if tuple(w_scale.shape) != (n,) or tuple(bias.shape) != (n,) or x.shape[-1] != k:
            raise VerificationError(
                f"{node.name}: w8a8_dynamic_linear weight_scale {tuple(w_scale.shape)}, bias {tuple(bias.shape)} "
                f"and input [..., {x.shape[-1]}] do not fit weight [{n}, {k}]"
            )


def _constant(gm: GraphModule, node):
    if node.op == "get_attr":
        return getattr(gm, node.target, None)
    return node.meta.get("val")  # lifted constant placeholder
