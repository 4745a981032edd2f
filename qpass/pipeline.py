"""The pass pipeline: which passes run, in which order, and what each changed."""

from torch.export import ExportedProgram
from torch.fx.passes.infra.pass_manager import PassManager

from qpass.errors import QpassError
from qpass.passes.find_attention_sites import AttentionSite
from qpass.passes.insert_faquant_qdq import InsertFAQuantQDQPass
from qpass.passes.insert_kv_cache_qdq import InsertKVCacheQDQPass
from qpass.passes.verify import verify_graph
from qpass.program import graph_copy, rebuild
from qpass.recipe import Recipe


def quantize_program(program: ExportedProgram, sites: list[AttentionSite], recipe: Recipe,
                     verify: bool = True) -> tuple[ExportedProgram, dict[str, int]]:
    """The program with Q/DQ inserted as ``recipe.config`` asks; ``program`` itself is not changed.

    Returns the new program and, per pass, how many Q/DQ pairs it inserted.
    """
    config = recipe.config
    passes = []
    # FAQuant first, then C8: C8 inserts right after K/V, so the graph reads cache write -> attention
    # read (quantize for the cache, then FAQuant's quantize of what attention reads from it).
    if config.fa_quant:
        passes.append(InsertFAQuantQDQPass(sites, recipe))
    if config.kv_cache == "int8":
        passes.append(InsertKVCacheQDQPass(sites, recipe))
    manager = PassManager(passes, run_checks_after_each_pass=verify)
    manager.add_checks(verify_graph)
    gm = graph_copy(program)
    manager(gm)
    counts = {type(p).__name__: p.inserted for p in passes}
    for name, count in counts.items():
        if count == 0:
            raise QpassError(f"{name} inserted nothing although the config asks for it; the attention sites were not found in this graph")
    return rebuild(program, gm), counts
