"""Lower each quantized attention site to the int8 paged-KV-cache ops, for token-by-token decoding.

Input: the unlifted graph of a decoder program with Q/DQ (``--kv-int8`` and/or ``--fa-quant``),
``(input_ids [1, S], position_ids [1, S]) -> logits``. Per site, the K and V Quantize/Dequantize
and the attention become

    reshape_and_cache_int8(k [S, H_kv, D], v, key_cache_<i>, value_cache_<i>, slot_mapping, scales)
    paged_prefill_attention_int8(q [S, H, D], key_cache_<i>, value_cache_<i>, block_tables,
                                 context_lens, query_start_loc, scales, softmax_scale)

with the caches ``[num_blocks, block_size, H_kv, D]`` int8 and the paging tensors as new graph
inputs. The prefill op covers decode too: the S query tokens are the last S of the context.

The cache stores the codes of the Quantize that attention reads (the last one on K/V), written
with that Quantize's scales, so cache write + paged attention reproduce ``DQ(Q(k))`` exactly: with
C8 alone that is the C8 pair; with FAQuant alone the FAQuant pair; with both, the C8 round trip
stays in the graph in front of the write and the cache holds FAQuant codes. Q's FAQuant pair
stays as it is, in front of the paged op. The paged op is causal over the whole context, so a
site whose mask is anything else over ``max_context`` tokens (a sliding window smaller than that,
a padding or bidirectional mask) is refused.
"""

import operator

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from qpass.errors import QpassError
from qpass.passes.find_attention_sites import (CHECKS, FUSED_ATTENTION, MATMUL, PROB_GLUE, SOFTMAX, AttentionSite)
from qpass.passes.qdq import DEQUANTIZE, QUANTIZE
from qpass.runtime import paged_attention, paged_cache  # noqa: F401  (registers torch.ops.qpass.*)

aten = torch.ops.aten
CACHE_WRITE = torch.ops.qpass.reshape_and_cache_int8.default
PAGED_ATTENTION = torch.ops.qpass.paged_prefill_attention_int8.default
PAGING_INPUTS = ("block_tables", "context_lens", "slot_mapping", "query_start_loc")
SCORE_CASTS = {aten.to.dtype, aten._to_copy.default}


def cache_input_names(layer: int) -> tuple[str, str]:
    return f"key_cache_{layer}", f"value_cache_{layer}"


class LowerPagedAttentionPass(PassBase):
    """Rewrite every attention site (with its K/V Q/DQ) to the cache write and paged attention. In place.

    ``sites`` are found on the graph this pass runs on (:func:`find_attention_sites`); their q/k/v
    are then the Dequantize outputs attention reads. New placeholders: ``key_cache_<layer>``,
    ``value_cache_<layer>`` per site, then ``block_tables``, ``context_lens``, ``slot_mapping``,
    ``query_start_loc``. The caller fixes the graph's calling convention (plain positional args).
    """

    in_place = True

    def __init__(self, sites: list[AttentionSite], max_context: int):
        super().__init__()
        self.sites, self.max_context = sites, max_context
        self.lowered = 0

    def call(self, gm: GraphModule) -> PassResult:
        graph = gm.graph
        nodes = {n.name: n for n in graph.nodes}
        plans = [_plan(site, nodes) for site in self.sites]  # refuse before changing anything
        _check_causal(gm, plans, self.max_context)
        before = self.lowered
        inputs = _add_inputs(graph, self.sites)
        for site, plan in zip(self.sites, plans):
            _rewrite(graph, site, plan, inputs)
            self.lowered += 1
        _erase_dead(graph)
        gm.recompile()
        return PassResult(gm, self.lowered > before)


def verify_lowered(gm: GraphModule, num_sites: int) -> None:
    """Our invariants after lowering: no attention left, one cache write and one paged attention per
    site, each cache written and read, with float32 scales from constants."""
    graph = gm.graph
    graph.lint()
    left = [n.name for n in graph.nodes if n.target in FUSED_ATTENTION or n.target in SOFTMAX]
    writes = [n for n in graph.nodes if n.target is CACHE_WRITE]
    reads = [n for n in graph.nodes if n.target is PAGED_ATTENTION]
    if left or len(writes) != num_sites or len(reads) != num_sites:
        raise AssertionError(f"lowering left attention {left}, {len(writes)} cache writes and {len(reads)} paged "
                             f"attentions for {num_sites} sites")
    for write, read in zip(writes, reads):
        if write.args[2:4] != read.args[1:3] or any(a.op != "placeholder" for a in write.args[2:5]):
            raise AssertionError(f"{read.name} does not read the caches that {write.name} writes, or they are not inputs")
        if write.args[5:9] != read.args[6:10]:
            raise AssertionError(f"{read.name} reads the cache with other scales than {write.name} wrote it with")
        for param in write.args[5:9]:
            const = param.args[0]  # _per_channel(Quantize's scale or offset)
            value = operator.attrgetter(const.target)(gm) if const.op == "get_attr" else None
            if not (isinstance(value, torch.Tensor) and value.dtype == torch.float32):
                raise AssertionError(f"{write.name}: scale/offset {const.name} is not a float32 constant")


# ---------------------------------------------------------------------------------------------
# Matching: what each site reads, and how it scales and masks its scores
# ---------------------------------------------------------------------------------------------


def _plan(site: AttentionSite, nodes: dict[str, Node]) -> dict:
    attention = nodes[site.attention]
    plan = {"q": nodes[site.q], "attention": attention, "where": f"attention {attention.name} (layer {site.layer})"}
    for kind in ("k", "v"):
        dq = nodes[getattr(site, kind)]
        quant = dq.args[0] if dq.target is DEQUANTIZE else None
        if not (isinstance(quant, Node) and quant.target is QUANTIZE):
            raise QpassError(
                f"attention {site.attention} (layer {site.layer}): its {kind.upper()} has no Quantize/Dequantize in front of "
                "attention; lower a program quantized with --kv-int8 or --fa-quant (qpass.pipeline.quantize_program)"
            )
        plan[kind], plan[f"{kind}_scale"], plan[f"{kind}_offset"] = quant.args[:3]
    if site.form == "sdpa":
        args = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), attention.args))
        args.update(attention.kwargs)
        if args.get("dropout_p", 0.0) != 0.0:
            raise QpassError(f"{plan['where']}: dropout_p={args['dropout_p']}; export the model in eval mode")
        plan["scale"] = args.get("scale") or site.head_dim ** -0.5
        plan["mask"], plan["is_causal"], plan["output"] = args.get("attn_mask"), bool(args.get("is_causal")), attention
    else:
        plan["scale"], plan["mask"] = _score_glue(attention)
        plan["is_causal"], plan["output"] = False, _probs_matmul(attention)
    return plan


def _score_glue(softmax: Node) -> tuple[float, Node | None]:
    """Softmax scale and additive mask of ``softmax(mask + scores * c)`` (any order of mul/div/add/casts)."""
    if softmax.args[1] not in (-1, 3):
        raise QpassError(f"attention {softmax.name}: softmax over dim {softmax.args[1]}; the paged op needs it over the keys (-1)")
    scale, mask, node = 1.0, None, softmax.args[0]
    while node.target not in MATMUL:
        path = next(a for a in node.args if isinstance(a, Node) and len(a.meta["val"].shape) == 4)
        other = [a for a in node.args[:2] if a is not path]
        if node.target in SCORE_CASTS:
            pass
        elif node.target in (aten.mul.Tensor, aten.div.Tensor) and len(other) == 1 and isinstance(other[0], (int, float)):
            scale = scale * other[0] if node.target is aten.mul.Tensor else scale / other[0]
        elif node.target is aten.add.Tensor and mask is None and len(other) == 1 and isinstance(other[0], Node):
            mask = other[0]
        else:
            raise QpassError(
                f"attention {softmax.name}: {node.name} ({node.target}) between the scores and the softmax is not a scale, "
                "cast or additive mask; the paged op cannot apply it (softcapping, ALiBi and the like are not supported)"
            )
        node = path
    return scale, mask


def _probs_matmul(softmax: Node) -> Node:
    """The ``matmul(probs, v)`` of a matmul-softmax-matmul attention: its output is the attention output."""
    probs = softmax
    while True:
        (user,) = [u for u in probs.users if u.target not in CHECKS]
        if user.target in MATMUL and user.args[0] is probs:
            return user
        assert user.target in PROB_GLUE, f"{user.name}: find_attention_sites matched a pattern this pass does not know"
        probs = user


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
            raise QpassError(f"{name}: its mask adds biases other than 0 and -inf (ALiBi?); the paged op cannot apply them")
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


# ---------------------------------------------------------------------------------------------
# Rewriting
# ---------------------------------------------------------------------------------------------


def _add_inputs(graph: Graph, sites: list[AttentionSite]) -> dict[str, Node]:
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    names = [name for site in sites for name in cache_input_names(site.layer)] + list(PAGING_INPUTS)
    inputs = {}
    for name in names:
        with graph.inserting_after(last):
            last = inputs[name] = graph.placeholder(name)
    return inputs


def _rewrite(graph: Graph, site: AttentionSite, plan: dict, inputs: dict[str, Node]) -> None:
    key_cache, value_cache = (inputs[n] for n in cache_input_names(site.layer))
    output = plan["output"]
    with graph.inserting_before(output):
        scales = [graph.call_function(_per_channel, (plan[n],)) for n in ("k_scale", "k_offset", "v_scale", "v_offset")]
        key, value = graph.call_function(_to_tokens, (plan["k"],)), graph.call_function(_to_tokens, (plan["v"],))
        graph.call_function(CACHE_WRITE, (key, value, key_cache, value_cache, inputs["slot_mapping"], *scales))
        query = graph.call_function(_to_tokens, (plan["q"],))
        out = graph.call_function(PAGED_ATTENTION, (query, key_cache, value_cache, inputs["block_tables"],
                                                    inputs["context_lens"], inputs["query_start_loc"], *scales,
                                                    float(plan["scale"])))
        lowered = graph.call_function(_from_tokens, (out,))
    lowered.meta["nn_module_stack"] = dict(output.meta.get("nn_module_stack", {}))
    output.replace_all_uses_with(lowered)


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[1, H, S, D] -> [S, H, D]`` (one sequence; tokens first, as the paged ops take them)."""
    return x[0].transpose(0, 1).contiguous()


def _from_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[S, H, D] -> [1, H, S, D]``, the attention output layout the rest of the graph reads."""
    return x.transpose(0, 1).unsqueeze(0)


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    """A per-head, per-dim Q/DQ parameter ``[H, 1, D]`` as the cache ops take it, ``[H, D]``."""
    return t.reshape(t.shape[0], t.shape[-1])


def _erase_dead(graph: Graph) -> None:
    """Remove what the rewrite left unused: old attention, its mask computation, and the metadata
    asserts on them (which ``eliminate_dead_code`` keeps alive as side effects)."""
    live, stack = set(), [n for n in graph.nodes if n.op == "output" or (n.is_impure(impure_random=False) and n.target not in CHECKS)]
    while stack:
        node = stack.pop()
        if node not in live:
            live.add(node)
            stack.extend(node.all_input_nodes)
    for node in reversed(graph.nodes):
        if node not in live and node.op in ("call_function", "call_method", "get_attr"):
            graph.erase_node(node)

