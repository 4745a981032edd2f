"""The torch.export frontend's pass pipeline: which passes run, in which order, and what each changed.

    quantize (on the captured program, lifted):
      1. InsertFAQuantQDQPass      Q/DQ on q, k, v                      (--fa-quant)
      2. InsertKVCacheQDQPass      Q/DQ on k, v as the cache stores them (--kv-int8 [static|dynamic])
      3. InsertW8A8Pass            aten.linear -> qpass::w8a8_linear     (--w8a8)
    lower (on the quantized decoder program, unlifted, for paged decoding):
      4. FuseQuantizedAttentionPass   Q/DQ + attention -> qpass::int8_kv_attention[_dynamic] (generic)
      5. LowerPagedAttentionPass      int8_kv_attention -> cache write + paged attention (backend)

Every pass reports its ``count`` of rewrites; the graph is verified after each pass.
"""

import torch
from torch.export import Dim, ExportedProgram
from torch.fx import GraphModule
from torch.fx.graph import CodeGen
from torch.fx.passes.infra.pass_manager import PassManager

from qpass.core.errors import QpassError
from qpass.core.recipe import Recipe
from qpass.core.sites import AttentionSite
from qpass.core.smoothing import apply_smoothing
from qpass.frontends.torch_export.capture import WRAPPER_PREFIX, param_names
from qpass.frontends.torch_export.program import graph_copy, rebuild
from qpass.passes.fx.find_attention_sites import find_attention_sites
from qpass.passes.fx.find_linear_sites import find_linear_sites
from qpass.passes.fx.fuse_quantized_attention import FuseQuantizedAttentionPass, verify_fused
from qpass.passes.fx.insert_faquant_qdq import InsertFAQuantQDQPass
from qpass.passes.fx.insert_kv_cache_qdq import InsertKVCacheQDQPass
from qpass.passes.fx.insert_w8a8 import InsertW8A8Pass
from qpass.passes.fx.lower_paged_attention import (
    CACHE_WRITE_DYNAMIC,
    PAGING_INPUTS,
    LowerPagedAttentionPass,
    verify_lowered,
)
from qpass.passes.fx.verify import verify_graph
from qpass.runtime.paged_cache import allocate_kv_cache, allocate_kv_scale_cache
from qpass.runtime.paged_checks import BLOCK_SIZES, HEAD_DIMS

BLOCK_SIZE = 16
MAX_CONTEXT = 2048  # the lowered program is checked causal, and accepts contexts, up to this many tokens


def quantize_passes(
    program: ExportedProgram, sites: list[AttentionSite], recipe: Recipe, state_dict: dict[str, torch.Tensor]
) -> list:
    """Passes 1-3 as ``recipe.config`` asks, in order. FAQuant first, then C8: C8 inserts right after K/V,
    so the graph reads cache write -> attention read (quantize for the cache, then FAQuant's quantize of
    what attention reads from it). W8A8 last: it replaces the Linears (whose outputs the Q/DQ above may
    already read) and quantizes the smoothed weights in ``state_dict``."""
    config = recipe.config
    passes = []
    if config.fa_quant:
        passes.append(InsertFAQuantQDQPass(sites, recipe))
    if config.kv_cache is not None:
        passes.append(InsertKVCacheQDQPass(sites, recipe))
    if config.w8a8:
        linears = find_linear_sites(program.graph, param_names(program))
        params = {p: state_dict[n] for p, n in program.graph_signature.inputs_to_parameters.items()}
        passes.append(InsertW8A8Pass(linears, recipe, params))
    return passes


def lower_passes(sites: list[AttentionSite], max_context: int) -> list:
    """Passes 4-5: the generic op first, then the backend's paged ops (a separate stage)."""
    return [FuseQuantizedAttentionPass(sites, max_context), LowerPagedAttentionPass()]


def quantize_program(
    program: ExportedProgram, sites: list[AttentionSite], recipe: Recipe, verify: bool = True
) -> tuple[ExportedProgram, dict[str, int]]:
    """The program with Q/DQ and W8A8 Linears as ``recipe.config`` asks; ``program`` itself is not changed.

    Returns the new program and each pass's count (Q/DQ pairs or W8A8 Linears inserted).
    """
    # Smoothing is not a graph rewrite: the recipe's scales are folded into the parameter values
    # (qpass.core.smoothing), exactly as calibration observed them.
    state_dict = smoothed_state_dict(program, recipe)
    passes = quantize_passes(program, sites, recipe, state_dict)
    gm = graph_copy(program)
    counts = run_passes(gm, passes, verify_graph if verify else None)
    for name, count in counts.items():
        if count == 0 and not (name == InsertW8A8Pass.__name__ and recipe.float_linears):
            raise QpassError(
                f"{name} inserted nothing although the config asks for it; "
                "the attention sites or Linears were not found in this graph"
            )
    return rebuild(program, gm, state_dict), counts


def run_passes(gm: GraphModule, passes: list, check) -> dict[str, int]:
    """Run ``passes`` in order under torch.fx's PassManager, ``check(gm)`` after each; each pass's count."""
    manager = PassManager(passes, run_checks_after_each_pass=check is not None)
    if check is not None:
        manager.add_checks(check)  # one check: PassManager.add_checks replaces the previous one
    try:
        manager(gm)
    except Exception as err:  # PassManager wraps what a pass raises; a refusal must reach the user as it is
        raise err.__cause__ if isinstance(err.__cause__, QpassError) else err
    return {type(p).__name__: p.count for p in passes}


def smoothed_state_dict(program: ExportedProgram, recipe: Recipe) -> dict[str, torch.Tensor]:
    """``program.state_dict`` with the recipe's smoothing groups folded in (a new dict; nothing is written in place)."""
    groups = recipe.smoothing
    if not groups:
        return program.state_dict
    hf = {k.removeprefix(WRAPPER_PREFIX): v for k, v in program.state_dict.items()}
    missing = sorted({n for g in groups for n in [g["prev"], *g["consumers"]] if f"{n}.weight" not in hf})
    if missing:
        raise QpassError(
            f"recipe: smoothing names {missing[:3]} which this model does not have; calibrate this model instead"
        )
    smoothed = apply_smoothing(hf, groups, recipe.tensors)
    return {
        WRAPPER_PREFIX + k: torch.nn.Parameter(v, requires_grad=False)
        if isinstance(hf[k], torch.nn.Parameter) and v is not hf[k]
        else v
        for k, v in smoothed.items()
    }


def lower_program(
    program: ExportedProgram, block_size: int = BLOCK_SIZE, max_context: int = MAX_CONTEXT, verify: bool = True
) -> ExportedProgram:
    """Lower a quantized decoder program (``(input_ids, position_ids) -> logits``) to the paged int8 ops.

    Runs passes 4-5 on the unlifted graph and re-exports it, so that the cache writes become input
    mutations of a valid, saveable ``ExportedProgram``. Its inputs: ``input_ids [1, S]``,
    ``position_ids [1, S]``, then per layer ``key_cache_<i>``, ``value_cache_<i>`` int8
    ``[num_blocks, block_size, kv_heads, head_dim]`` (the dynamic cache: and ``key_scale_cache_<i>``,
    ``value_scale_cache_<i>`` float32 ``[num_blocks, block_size, kv_heads, 2]``, scale and offset), then
    ``block_tables`` int32 ``[1, max_blocks]``, ``context_lens`` int32 ``[1]``, ``slot_mapping`` int64 ``[S]``,
    ``query_start_loc`` int32 ``[2]``.
    """
    if block_size not in BLOCK_SIZES:
        raise QpassError(f"block_size={block_size} is not supported by the paged ops; choose one of {BLOCK_SIZES}")
    gm = unlift_decoder(program)
    sites = find_attention_sites(gm.graph)
    bad = next((s for s in sites if s.head_dim not in HEAD_DIMS), None)
    if bad is not None:
        raise QpassError(
            f"attention {bad.attention}: head_dim={bad.head_dim} is not supported by the paged ops "
            f"(supported: {HEAD_DIMS}); keep the unlowered program for this model"
        )
    fuse, lower = lower_passes(sites, max_context)
    # verify_graph reads constants as attributes of the root module, which unlifted graphs nest: the
    # stages have their own check, and the lowered graph its final one.
    run_passes(gm, [fuse, lower], verify_fused if verify else None)
    if verify:
        verify_lowered(gm, len(sites))
    if fuse.count != len(sites) or lower.count != len(sites):
        raise QpassError(
            f"lowering rewrote {fuse.count} and {lower.count} of {len(sites)} attention sites; please report this model"
        )
    seq = Dim("seq", min=1, max=max_context)
    blocks, width = Dim("num_blocks", min=1), Dim("max_blocks", min=1, max=max(2, -(-max_context // block_size)))
    dynamic = bool(gm.graph.find_nodes(op="call_function", target=CACHE_WRITE_DYNAMIC))
    caches = [layer_caches(4, block_size, s.num_kv_heads, s.head_dim, dynamic) for s in sites]
    example = decoder_inputs(
        torch.zeros(1, 4, dtype=torch.long),
        torch.arange(4)[None],
        caches,
        torch.tensor([[0, 1]], dtype=torch.int32),
        torch.tensor([4], dtype=torch.int32),
        torch.arange(4),
        torch.tensor([0, 4], dtype=torch.int32),
    )
    cache_dims = [{0: blocks}] * sum(len(c) for c in caches)
    dynamic = ({1: seq}, {1: seq}, *cache_dims, {1: width}, None, {0: seq}, None)
    with torch.no_grad():
        lowered = torch.export.export(gm, example, dynamic_shapes=dynamic, strict=False)
    for (
        node
    ) in lowered.graph.nodes:  # the re-export's provenance names the earlier graphs by id(): other bytes each run
        node.meta.pop("from_node", None)
    return lowered


def layer_caches(num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dynamic: bool) -> tuple:
    """One layer's zeroed cache inputs, in the lowered decoder's order: the int8 caches, then (``dynamic``)
    their scale caches."""
    caches = allocate_kv_cache(num_blocks, block_size, kv_heads, head_dim)
    return (*caches, *allocate_kv_scale_cache(num_blocks, block_size, kv_heads)) if dynamic else caches


def decoder_inputs(input_ids, position_ids, caches, block_tables, context_lens, slot_mapping, query_start_loc) -> tuple:
    """The lowered decoder's positional inputs, in order (see :func:`lower_program`); ``caches``: each layer's
    :func:`layer_caches`."""
    assert len(PAGING_INPUTS) == 4
    return (
        input_ids,
        position_ids,
        *(t for layer in caches for t in layer),
        block_tables,
        context_lens,
        slot_mapping,
        query_start_loc,
    )


def unlift_decoder(program: ExportedProgram) -> GraphModule:
    """``program`` as a graph module with plain positional inputs ``(input_ids, position_ids)`` returning
    the logits, so a pass can add inputs (the pytree calling convention and guard hook are dropped)."""
    gm = program.module()
    graph = gm.graph
    for node in [n for n in graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
        graph.erase_node(node)
    output = graph.output_node()
    (logits,) = output.args[0]
    output.args = (logits,)
    graph._codegen = CodeGen()
    return GraphModule(gm, graph)
