"""Lower each ``int8_kv_attention`` to the int8 paged-KV-cache ops, for token-by-token decoding.

The second lowering stage (after ``fuse_quantized_attention.py``), on the unlifted decoder graph
``(input_ids [1, S], position_ids [1, S]) -> logits``. Each generic op, in graph order (the layer
order), becomes

    reshape_and_cache_int8(k [S, H_kv, D], v, key_cache_<i>, value_cache_<i>, slot_mapping, scales)
    paged_prefill_attention_int8(q [S, H, D], key_cache_<i>, value_cache_<i>, block_tables,
                                 context_lens, query_start_loc, scales, softmax_scale)

with the caches ``[num_blocks, block_size, H_kv, D]`` int8 and the paging tensors as new graph
inputs. The prefill op covers decode too: the S query tokens are the last S of the context. The
cache write quantizes with the same scales the generic op names, so cache write + paged attention
reproduce it exactly. ``int8_kv_attention_dynamic`` (the dynamic cache) becomes the ``*_dynamic``
pair of the same ops, whose scales are two more inputs per layer, ``key_scale_cache_<i>`` and
``value_scale_cache_<i>``, float32 ``[num_blocks, block_size, H_kv, 2]`` (scale, offset), written beside the codes.
"""

import operator

import torch
from torch.fx import Graph, GraphModule, Node

from qpass.passes.fx.base import CountingPass
from qpass.passes.fx.fuse_quantized_attention import INT8_KV_ATTENTION, INT8_KV_ATTENTION_DYNAMIC, erase_dead
from qpass.passes.fx.patterns import match_attention
from qpass.runtime import paged_attention, paged_attention_dynamic, paged_cache  # noqa: F401  (registers torch.ops.qpass.*)

CACHE_WRITE = torch.ops.qpass.reshape_and_cache_int8.default
PAGED_ATTENTION = torch.ops.qpass.paged_prefill_attention_int8.default
CACHE_WRITE_DYNAMIC = torch.ops.qpass.reshape_and_cache_int8_dynamic.default
PAGED_ATTENTION_DYNAMIC = torch.ops.qpass.paged_prefill_attention_int8_dynamic.default
PAGING_INPUTS = ("block_tables", "context_lens", "slot_mapping", "query_start_loc")
GENERIC = (INT8_KV_ATTENTION, INT8_KV_ATTENTION_DYNAMIC)


def cache_input_names(layer: int, dynamic: bool = False) -> tuple[str, ...]:
    """The cache inputs of ``layer``: its int8 caches, then (the dynamic cache) their scales."""
    names = (f"key_cache_{layer}", f"value_cache_{layer}")
    return (*names, f"key_scale_cache_{layer}", f"value_scale_cache_{layer}") if dynamic else names


class LowerPagedAttentionPass(CountingPass):
    """Rewrite every ``int8_kv_attention`` to the cache write and paged attention; counts them.

    New placeholders: ``key_cache_<layer>``, ``value_cache_<layer>`` (and ``key_scale_cache_<layer>``,
    ``value_scale_cache_<layer>`` for the dynamic op) per op, then ``block_tables``, ``context_lens``,
    ``slot_mapping``, ``query_start_loc``. The caller fixes the graph's calling
    convention (plain positional args).
    """

    recompile = True  # its module is exported or run as it is

    def rewrite(self, gm: GraphModule) -> int:
        graph = gm.graph
        fused = [n for n in graph.nodes if n.op == "call_function" and n.target in GENERIC]
        if not fused:
            return 0
        inputs = _add_inputs(graph, [n.target is INT8_KV_ATTENTION_DYNAMIC for n in fused])
        for layer, node in enumerate(fused):
            _rewrite(graph, layer, node, inputs)
        erase_dead(graph)
        return len(fused)


def verify_lowered(gm: GraphModule, num_sites: int) -> None:
    """Our invariants after lowering: no attention left, one cache write and one paged attention per
    site, each cache written and read, with float32 scales from constants (the dynamic cache: with the
    scale caches it writes, graph inputs)."""
    graph = gm.graph
    graph.lint()
    left = [n.name for n in graph.nodes if match_attention(n) is not None or n.target in GENERIC]
    writes = [n for n in graph.nodes if n.target in (CACHE_WRITE, CACHE_WRITE_DYNAMIC)]
    reads = [n for n in graph.nodes if n.target in (PAGED_ATTENTION, PAGED_ATTENTION_DYNAMIC)]
    if left or len(writes) != num_sites or len(reads) != num_sites:
        raise AssertionError(
            f"lowering left attention {left}, {len(writes)} cache writes and {len(reads)} paged "
            f"attentions for {num_sites} sites"
        )
    for write, read in zip(writes, reads):
        dynamic = write.target is CACHE_WRITE_DYNAMIC
        if write.args[2:4] != read.args[1:3] or any(a.op != "placeholder" for a in write.args[2:5]):
            raise AssertionError(
                f"{read.name} does not read the caches that {write.name} writes, or they are not inputs"
            )
        if write.args[5:] != read.args[6:-1] or dynamic != (read.target is PAGED_ATTENTION_DYNAMIC):
            raise AssertionError(f"{read.name} reads the cache with other scales than {write.name} wrote it with")
        if dynamic:
            if any(a.op != "placeholder" for a in write.args[5:]):
                raise AssertionError(f"{write.name}: the dynamic cache's scale caches are not graph inputs")
            continue
        for param in write.args[5:9]:
            const = param.args[0]  # per_channel(Quantize's scale or offset)
            value = operator.attrgetter(const.target)(gm) if const.op == "get_attr" else None
            if not (isinstance(value, torch.Tensor) and value.dtype == torch.float32):
                raise AssertionError(f"{write.name}: scale/offset {const.name} is not a float32 constant")


def _add_inputs(graph: Graph, dynamic: list[bool]) -> dict[str, Node]:
    """Placeholders for each layer's caches (``dynamic[layer]``: with scale caches) and the paging tensors."""
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    names = [name for layer, d in enumerate(dynamic) for name in cache_input_names(layer, d)] + list(PAGING_INPUTS)
    inputs = {}
    for name in names:
        with graph.inserting_after(last):
            last = inputs[name] = graph.placeholder(name)
    return inputs


def _rewrite(graph: Graph, layer: int, node: Node, inputs: dict[str, Node]) -> None:
    if node.target is INT8_KV_ATTENTION_DYNAMIC:  # scales: the scale caches the write fills
        key_cache, value_cache, *scales = (inputs[n] for n in cache_input_names(layer, dynamic=True))
        q, k, v, softmax_scale = node.args
        write, read = CACHE_WRITE_DYNAMIC, PAGED_ATTENTION_DYNAMIC
    else:
        key_cache, value_cache = (inputs[n] for n in cache_input_names(layer))
        q, k, v, *scales, softmax_scale = node.args
        write, read = CACHE_WRITE, PAGED_ATTENTION
    with graph.inserting_before(node):
        key, value = graph.call_function(_to_tokens, (k,)), graph.call_function(_to_tokens, (v,))
        graph.call_function(write, (key, value, key_cache, value_cache, inputs["slot_mapping"], *scales))
        query = graph.call_function(_to_tokens, (q,))
        out = graph.call_function(
            read,
            (
                query,
                key_cache,
                value_cache,
                inputs["block_tables"],
                inputs["context_lens"],
                inputs["query_start_loc"],
                *scales,
                softmax_scale,
            ),
        )
        lowered = graph.call_function(_from_tokens, (out,))
    lowered.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
    node.replace_all_uses_with(lowered)


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[1, H, S, D] -> [S, H, D]`` (one sequence; tokens first, as the paged ops take them)."""
    return x[0].transpose(0, 1).contiguous()


def _from_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[S, H, D] -> [1, H, S, D]``, the attention output layout the rest of the graph reads."""
    return x.transpose(0, 1).unsqueeze(0)
