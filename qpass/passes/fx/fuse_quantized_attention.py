"""Fuse each attention whose K and V carry Quantize/Dequantize into the generic quantized-attention op.

The first of the two lowering stages (the second is ``lower_paged_attention.py``). Input: the
unlifted graph of a decoder program with Q/DQ (``--kv-int8`` and/or ``--fa-quant``),
``(input_ids [1, S], position_ids [1, S]) -> logits``. Per site, the K and V Quantize/Dequantize, GQA's
repeat and the attention (any spelling of :mod:`qpass.passes.fx.patterns`) become

    int8_kv_attention(q [B, H, S, D], k [B, H_kv, S, D], v, k_scale, k_offset, v_scale, v_offset, softmax_scale)

with the scales of the Quantize that attention reads (the last one on K/V): with C8 alone the C8
pair; with FAQuant alone the FAQuant pair; with both, the C8 round trip stays in front and the op
stores FAQuant codes. Q's FAQuant pair stays as it is. K and V behind the dynamic cache's
``fake_quant_int8_dynamic`` (``--kv-int8 dynamic``) become

    int8_kv_attention_dynamic(q, k, v, softmax_scale)

whose scales are computed from K and V as the cache is written. The op is causal over the whole context, so
a site whose mask is anything else over ``max_context`` tokens (a sliding window smaller than that,
a padding or bidirectional mask, ALiBi) is refused before anything is changed.
"""

import operator

import torch
from torch.fx import Graph, GraphModule, Node

from qpass.core.errors import QpassError
from qpass.core.sites import AttentionSite
from qpass.passes.fx.base import CountingPass
from qpass.passes.fx.patterns import CHECKS, MATMUL, aten, match_attention
from qpass.passes.fx.qdq import DEQUANTIZE, FAKE_QUANT_DYNAMIC, QUANTIZE
from qpass.runtime import int8_attention  # noqa: F401  (registers torch.ops.qpass.int8_kv_attention*)

INT8_KV_ATTENTION = torch.ops.qpass.int8_kv_attention.default
INT8_KV_ATTENTION_DYNAMIC = torch.ops.qpass.int8_kv_attention_dynamic.default
SCORE_CASTS = {aten.to.dtype, aten._to_copy.default}


class FuseQuantizedAttentionPass(CountingPass):
    """Rewrite every attention site (with its K/V Q/DQ) to ``int8_kv_attention``; counts the sites.

    ``sites`` are found on the graph this pass runs on (their q/k/v are then the Dequantize outputs
    attention reads); ``max_context`` is the longest context the decoder accepts (masks are checked
    causal up to it).
    """

    recompile = True  # its module is exported or run as it is

    def __init__(self, sites: list[AttentionSite], max_context: int):
        super().__init__()
        self.sites, self.max_context = sites, max_context

    def rewrite(self, gm: GraphModule) -> int:
        graph = gm.graph
        nodes = {n.name: n for n in graph.nodes}
        plans = [_plan(site, nodes) for site in self.sites]  # refuse before changing anything
        _check_causal(gm, plans, self.max_context)
        for plan in plans:
            output = plan["output"]
            with graph.inserting_before(output):
                if plan["dynamic"]:
                    fused = graph.call_function(
                        INT8_KV_ATTENTION_DYNAMIC, (plan["q"], plan["k"], plan["v"], float(plan["scale"]))
                    )
                else:
                    scales = [
                        graph.call_function(per_channel, (plan[n],))
                        for n in ("k_scale", "k_offset", "v_scale", "v_offset")
                    ]
                    fused = graph.call_function(
                        INT8_KV_ATTENTION, (plan["q"], plan["k"], plan["v"], *scales, float(plan["scale"]))
                    )
            fused.meta["nn_module_stack"] = dict(output.meta.get("nn_module_stack", {}))
            output.replace_all_uses_with(fused)
        if plans:  # what the rewrites left unused; with none, the graph stays as it is (modified False is the truth)
            erase_dead(graph)
        return len(plans)


def verify_fused(gm: GraphModule) -> None:
    """Invariants that hold before, between and after the lowering stages: the graph lints, and every
    ``int8_kv_attention`` reads float32 constant scales (``int8_kv_attention_dynamic`` reads none)."""
    gm.graph.lint()
    for node in gm.graph.find_nodes(op="call_function", target=INT8_KV_ATTENTION):
        for param in node.args[3:7]:
            const = param.args[0]  # per_channel(Quantize's scale or offset)
            value = operator.attrgetter(const.target)(gm) if const.op == "get_attr" else None
            if not (isinstance(value, torch.Tensor) and value.dtype == torch.float32):
                raise AssertionError(f"{node.name}: scale/offset {const.name} is not a float32 constant")


def per_channel(t: torch.Tensor) -> torch.Tensor:
    """A per-head, per-dim Q/DQ parameter ``[H, 1, D]`` as the cache ops take it, ``[H, D]``."""
    return t.reshape(t.shape[0], t.shape[-1])


def _plan(site: AttentionSite, nodes: dict[str, Node]) -> dict:
    attention = nodes[site.attention]
    plan = {"q": nodes[site.q], "attention": attention, "where": f"attention {attention.name} (layer {site.layer})"}
    forms = {nodes[getattr(site, kind)].target is FAKE_QUANT_DYNAMIC for kind in ("k", "v")}
    if len(forms) > 1:
        raise QpassError(
            f"{plan['where']}: one of K and V has the dynamic cache's fake quant and the other not; "
            "quantize both with one --kv-int8 form"
        )
    plan["dynamic"] = forms == {True}
    for kind in ("k", "v"):
        dq = nodes[getattr(site, kind)]
        if plan["dynamic"]:
            plan[kind] = dq.args[0]
            continue
        quant = dq.args[0] if dq.target is DEQUANTIZE else None
        if not (isinstance(quant, Node) and quant.target is QUANTIZE):
            raise QpassError(
                f"attention {site.attention} (layer {site.layer}): its {kind.upper()} has no Quantize/Dequantize "
                "in front of attention; lower a program quantized with --kv-int8 or --fa-quant"
            )
        plan[kind], plan[f"{kind}_scale"], plan[f"{kind}_offset"] = quant.args[:3]
    match = match_attention(attention)
    if site.form == "sdpa":
        args = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), attention.args))
        args.update(attention.kwargs)
        if args.get("dropout_p", 0.0) != 0.0:
            raise QpassError(f"{plan['where']}: dropout_p={args['dropout_p']}; export the model in eval mode")
        plan["scale"] = args.get("scale") or site.head_dim**-0.5
        plan["mask"], plan["is_causal"], plan["output"] = args.get("attn_mask"), bool(args.get("is_causal")), attention
    else:
        plan["scale"], plan["mask"] = _score_glue(attention)
        plan["is_causal"], plan["output"] = False, match.output
    return plan


def _score_glue(softmax: Node) -> tuple[float, Node | None]:
    """Softmax scale and additive mask of ``softmax(mask + scores * c)`` (any order of mul/div/add/casts)."""
    if softmax.args[1] not in (-1, 3):
        raise QpassError(
            f"attention {softmax.name}: softmax over dim {softmax.args[1]}; the paged op needs it over the keys (-1)"
        )
    scale, mask, node = 1.0, None, softmax.args[0]
    while node.target not in MATMUL:
        path = next(a for a in node.args if isinstance(a, Node) and len(a.meta["val"].shape) == 4)
        other = [a for a in node.args[:2] if a is not path]
        if node.target in SCORE_CASTS:
            pass
        elif (
            node.target in (aten.mul.Tensor, aten.div.Tensor) and len(other) == 1 and isinstance(other[0], (int, float))
        ):
            scale = scale * other[0] if node.target is aten.mul.Tensor else scale / other[0]
        elif node.target is aten.add.Tensor and mask is None and len(other) == 1 and isinstance(other[0], Node):
            mask = other[0]
        else:
            raise QpassError(
                f"attention {softmax.name}: {node.name} ({node.target}) between the scores and the softmax "
                "is not a scale, cast or additive mask; the paged op cannot apply it "
                "(softcapping, ALiBi and the like are not supported)"
            )
        node = path
    return scale, mask


def _check_causal(gm: GraphModule, plans: list[dict], max_context: int) -> None:
    """Run the graph's mask computation for ``max_context`` tokens and refuse any mask but the causal one."""
    masks = list(dict.fromkeys(p["mask"] for p in plans if p["mask"] is not None))
    values = dict(zip(masks, _evaluate(gm, masks, max_context))) if masks else {}
    causal = torch.ones(max_context, max_context, dtype=torch.bool).tril()
    for plan in plans:
        name = plan["where"]
        if plan["mask"] is None:
            if not plan["is_causal"]:
                raise QpassError(f"{name} has no mask and is not causal; the paged op serves causal decoders only")
            continue
        mask = values[plan["mask"]]
        keep = mask if mask.dtype == torch.bool else mask == 0
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask < -1e30) | mask.isneginf()).all()):
            raise QpassError(
                f"{name}: its mask adds biases other than 0 and -inf (ALiBi?); the paged op cannot apply them"
            )
        keep = keep.reshape(-1, *keep.shape[-2:])
        if plan["is_causal"] or keep.shape[-2:] != causal.shape or not bool((keep == causal).all()):
            raise QpassError(
                f"{name}: its mask over {max_context} tokens is not the causal mask (a sliding window shorter than "
                "the context, or padding); the paged op attends to the whole context, so this site cannot be lowered; "
                "lower with a max_context within the window, or keep the unlowered program"
            )


def _evaluate(gm: GraphModule, outputs: list[Node], length: int) -> list[torch.Tensor]:
    """Values of ``outputs`` for ``input_ids = 0`` and ``position_ids = arange(length)`` from a copy of
    only the nodes they depend on (the mask computation, not the model)."""
    needed, stack = set(), list(outputs)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    graph, env = Graph(), {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in gm.graph.nodes:
        if node in needed or node in placeholders[:2]:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[n] for n in outputs))
    ids = torch.zeros(1, length, dtype=torch.long)
    with torch.no_grad():
        return list(GraphModule(gm, graph)(ids, torch.arange(length)[None]))


def erase_dead(graph: Graph) -> None:
    """Remove what a rewrite left unused: old attention, its mask computation, and the metadata
    asserts on them (which ``eliminate_dead_code`` keeps alive as side effects)."""
    live, stack = (
        set(),
        [n for n in graph.nodes if n.op == "output" or (n.is_impure(impure_random=False) and n.target not in CHECKS)],
    )
    while stack:
        node = stack.pop()
        if node not in live:
            live.add(node)
            stack.extend(node.all_input_nodes)
    for node in reversed(graph.nodes):
        if node not in live and node.op in ("call_function", "call_method", "get_attr"):
            graph.erase_node(node)
