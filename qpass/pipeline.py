"""The pass pipeline: which passes run, in which order, and what each changed."""

import torch
from torch.export import ExportedProgram
from torch.fx.passes.infra.pass_manager import PassManager

from qpass.capture import WRAPPER_PREFIX, param_names
from qpass.errors import QpassError
from qpass.passes.find_attention_sites import AttentionSite
from qpass.passes.find_linear_sites import find_linear_sites
from qpass.passes.insert_faquant_qdq import InsertFAQuantQDQPass
from qpass.passes.insert_kv_cache_qdq import InsertKVCacheQDQPass
from qpass.passes.insert_w8a8 import InsertW8A8Pass
from qpass.passes.verify import verify_graph
from qpass.program import graph_copy, rebuild
from qpass.recipe import Recipe
from qpass.smoothing import apply_smoothing

def quantize_program(program: ExportedProgram, sites: list[AttentionSite], recipe: Recipe,
                     verify: bool = True) -> tuple[ExportedProgram, dict[str, int]]:
    """The program with Q/DQ and W8A8 Linears as ``recipe.config`` asks; ``program`` itself is not changed.

    Returns the new program and, per pass, how many Q/DQ pairs (or W8A8 Linears) it inserted.
    """
    config = recipe.config
    state_dict = program.state_dict
    passes = []
    # FAQuant first, then C8: C8 inserts right after K/V, so the graph reads cache write -> attention
    # read (quantize for the cache, then FAQuant's quantize of what attention reads from it).
    if config.fa_quant:
        passes.append(InsertFAQuantQDQPass(sites, recipe))
    if config.kv_cache == "int8":
        passes.append(InsertKVCacheQDQPass(sites, recipe))
    if config.w8a8:
        # Smoothing is not a graph rewrite: the recipe's scales are folded into the parameter values
        # (qpass/smoothing.py), exactly as calibration observed them. W8A8 last: it replaces the Linears
        # (whose outputs the Q/DQ above may already read) and quantizes the smoothed weights.
        state_dict = smoothed_state_dict(program, recipe)
        linears = find_linear_sites(program.graph, param_names(program))
        params = {p: state_dict[n] for p, n in program.graph_signature.inputs_to_parameters.items()}
        passes.append(InsertW8A8Pass(linears, recipe, params))
    manager = PassManager(passes, run_checks_after_each_pass=verify)
    manager.add_checks(verify_graph)  # one check: PassManager.add_checks replaces the previous one
    gm = graph_copy(program)
    manager(gm)
    counts = {type(p).__name__: p.replaced if isinstance(p, InsertW8A8Pass) else p.inserted for p in passes}
    for name, count in counts.items():
        floats = recipe.w8a8.get("float_linears", {})
        if count == 0 and not (name == InsertW8A8Pass.__name__ and floats):
            raise QpassError(f"{name} inserted nothing although the config asks for it; "
                             "the attention sites or Linears were not found in this graph")
    return rebuild(program, gm, state_dict), counts


def smoothed_state_dict(program: ExportedProgram, recipe: Recipe) -> dict[str, torch.Tensor]:
    """``program.state_dict`` with the recipe's smoothing groups folded in (a new dict; nothing is written in place)."""
    groups = recipe.w8a8.get("smooth", [])
    if not groups:
        return program.state_dict
    hf = {k.removeprefix(WRAPPER_PREFIX): v for k, v in program.state_dict.items()}
    missing = sorted({n for g in groups for n in [g["prev"], *g["consumers"]] if f"{n}.weight" not in hf})
    if missing:
        raise QpassError(f"recipe: smoothing names {missing[:3]} which this model does not have; calibrate this model instead")
    smoothed = apply_smoothing(hf, groups, recipe.tensors)
    return {WRAPPER_PREFIX + k: torch.nn.Parameter(v, requires_grad=False) if isinstance(hf[k], torch.nn.Parameter)
            and v is not hf[k] else v for k, v in smoothed.items()}
