"""The mechanism the Q/DQ passes share: put ``dequantize(quantize(x))`` after a node of an exported graph, or
the dynamic cache's round trip ``fake_quant_int8_dynamic(x)`` (scales from ``x`` itself, no constants)."""

import torch
from torch.fx import GraphModule, Node

from qpass.runtime import quant_ops  # noqa: F401  (registers torch.ops.qpass.*)

QUANTIZE = torch.ops.qpass.quantize_int8.default
DEQUANTIZE = torch.ops.qpass.dequantize_int8.default
FAKE_QUANT_DYNAMIC = torch.ops.qpass.fake_quant_int8_dynamic.default


def insert_qdq(gm: GraphModule, node: Node, scale: torch.Tensor, offset: torch.Tensor, name: str) -> Node:
    """Replace every use of ``node`` by ``dequantize(quantize(node, scale, offset))``.

    ``scale`` and ``offset`` (float32, broadcastable to ``node``) become constants of ``gm`` named
    ``name + "_scale"`` / ``"_offset"``; they are lifted into program inputs when the program is
    rebuilt (:func:`qpass.program.rebuild`), which also gives them ``meta["val"]``; the new op nodes get
    theirs here so the rebuilt program verifies.
    """
    val = node.meta["val"]
    fake_mode = val.fake_mode
    graph = gm.graph
    users = [u for u in node.users]
    # fresh (non-view) tensors: fake-tensor conversion of views is slow
    gm.register_buffer(f"{name}_scale", scale.float().clone(memory_format=torch.contiguous_format))
    gm.register_buffer(f"{name}_offset", offset.float().clone(memory_format=torch.contiguous_format))
    with graph.inserting_after(node):
        s = graph.get_attr(f"{name}_scale")
    with graph.inserting_after(s):
        o = graph.get_attr(f"{name}_offset")
    with graph.inserting_after(o):
        q = graph.call_function(QUANTIZE, (node, s, o))
    with graph.inserting_after(q):
        dq = graph.call_function(DEQUANTIZE, (q, s, o, val.dtype))
    with fake_mode:  # what the ops' fake implementations return, without dispatching through them
        q.meta["val"] = torch.empty_like(val, dtype=torch.int8)
        dq.meta["val"] = torch.empty_like(val)
    for new in (s, o, q, dq):
        new.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
        new.meta["stack_trace"] = node.meta.get("stack_trace")
    for user in users:
        user.replace_input_with(node, dq)
    return dq


def insert_dynamic_fake_quant(gm: GraphModule, node: Node) -> Node:
    """Replace every use of ``node`` (``[B, H_kv, S, D]``) by ``fake_quant_int8_dynamic(node)``: int8 with a
    asymmetric scale and offset per token and kv head, as the dynamic cache stores it."""
    val, graph = node.meta["val"], gm.graph
    users = list(node.users)
    with graph.inserting_after(node):
        fq = graph.call_function(FAKE_QUANT_DYNAMIC, (node,))
    with val.fake_mode:
        fq.meta["val"] = torch.empty_like(val)
    fq.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
    fq.meta["stack_trace"] = node.meta.get("stack_trace")
    for user in users:
        user.replace_input_with(node, fq)
    return fq


def per_head(t: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """``[heads, head_dim]`` or ``[heads * head_dim]`` -> ``[heads, 1, head_dim]`` to broadcast over
    ``[B, H, S, D]``."""
    return t.reshape(heads, 1, head_dim)


def insert_site_qdq(gm: GraphModule, sites, recipe, kinds: tuple[str, ...], prefix: str) -> int:
    """Q/DQ after each site's ``kinds`` (of q, k, v) with the recipe's ``<prefix>_<kind>`` scales; returns the count."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for site in sites:
        for kind in kinds:
            heads = site.num_heads if kind == "q" else site.num_kv_heads
            scale, offset = recipe.get(site.layer, f"{prefix}_{kind}")
            insert_qdq(
                gm,
                nodes[getattr(site, kind)],
                per_head(scale, heads, site.head_dim),
                per_head(offset, heads, site.head_dim),
                f"qpass_{prefix}_{kind}_{site.layer}",
            )
    return len(sites) * len(kinds)
