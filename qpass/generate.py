"""Greedy text generation from a paged int8 KV cache: build the lowered decoder program and run it.

The decoder program takes ``(input_ids [1, S], position_ids [1, S])`` with S dynamic, so one
program serves prefill (S = prompt length) and decode (S = 1). Lowered, it also takes the per-layer
int8 caches and the paging tensors (see ``passes/lower_paged_attention.py``) and writes the new
tokens' K/V into the caches in place.
"""

import json
from pathlib import Path

import torch
from torch.export import Dim, ExportedProgram
from torch.fx import GraphModule
from torch.fx.graph import CodeGen
from torch.fx.passes.infra.pass_manager import PassManager

from qpass.calibrate import geometry
from qpass.errors import QpassError
from qpass.passes.find_attention_sites import find_attention_sites
from qpass.passes.lower_paged_attention import PAGING_INPUTS, LowerPagedAttentionPass, verify_lowered
from qpass.pipeline import quantize_program
from qpass.recipe import Recipe
from qpass.runtime.paged_attention import BLOCK_SIZES, HEAD_DIMS
from qpass.runtime.paged_cache import BlockAllocator, BlockTables, allocate_kv_cache

DECODER_FILE = "decoder.pt2"
BLOCK_SIZE = 16
MAX_CONTEXT = 2048  # the lowered program is checked causal, and accepts contexts, up to this many tokens


class TokensAndPositions(torch.nn.Module):
    """``(input_ids [1, S], position_ids [1, S]) -> logits [1, S, vocab]``, no HF cache: the decoder qpass lowers."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def capture_decoder(model: torch.nn.Module, max_context: int = MAX_CONTEXT) -> ExportedProgram:
    """Export ``model`` over one sequence of 1 .. ``max_context`` tokens with explicit positions."""
    if max_context < 4:
        raise QpassError(f"max_context={max_context}: a decoder needs room for at least 4 tokens")
    seq = Dim("seq", min=1, max=max_context)
    example = (torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None])
    try:
        with torch.no_grad():
            return torch.export.export(TokensAndPositions(model), example, dynamic_shapes=({1: seq}, {1: seq}), strict=False)
    except Exception as err:  # torch.export raises many types; the user needs to know capture failed
        raise QpassError(f"decoder capture: torch.export could not trace {type(model).__name__} with position_ids "
                         f"({type(err).__name__}: {str(err).splitlines()[0]}); qpass supports decoder-only Hugging Face causal LMs") from err


def build_decoder(model: torch.nn.Module, recipe: Recipe, block_size: int = BLOCK_SIZE, max_context: int = MAX_CONTEXT,
                  verify: bool = True) -> tuple[ExportedProgram, ExportedProgram]:
    """The decoder with Q/DQ (the reference: recomputes the whole sequence) and the same lowered to paged ops.

    The pipeline, in order: capture the decoder; find its attention sites; insert Q/DQ with ``recipe``
    (:func:`quantize_program`); lower each site to the cache write and paged attention; re-export.
    """
    max_context = min(max_context, getattr(model.config, "max_position_embeddings", None) or max_context)
    program = capture_decoder(model, max_context)
    sites = find_attention_sites(program.graph)
    recipe.check_matches(geometry(sites))
    quantized, _ = quantize_program(program, sites, recipe, verify=verify)
    return quantized, lower_program(quantized, block_size, max_context, verify=verify)


def compile_decoder(model: torch.nn.Module, recipe: Recipe, verify: bool = True) -> tuple[ExportedProgram | None, dict]:
    """The lowered decoder for ``qpass compile`` (saved as ``decoder.pt2``), or None and the reason when this
    model cannot be lowered (head_dim the paged ops lack, a sliding window, ...); the compile goes on without it."""
    bad = next((s for s in recipe.sites if s.head_dim not in HEAD_DIMS), None)
    if bad is not None:  # known before any capture: skip cheaply
        return None, {"skipped": f"head_dim={bad.head_dim} is not supported by the paged ops (supported: {HEAD_DIMS})"}
    try:
        _, lowered = build_decoder(model, recipe, verify=verify)
    except QpassError as err:
        return None, {"skipped": str(err)}
    return lowered, {"file": DECODER_FILE, **decoder_layout(lowered)}


def lower_program(program: ExportedProgram, block_size: int = BLOCK_SIZE, max_context: int = MAX_CONTEXT,
                  verify: bool = True) -> ExportedProgram:
    """Lower a quantized decoder program (``(input_ids, position_ids) -> logits``) to the paged int8 ops.

    Runs :class:`LowerPagedAttentionPass` on the unlifted graph and re-exports it, so that the cache
    writes become input mutations of a valid, saveable ``ExportedProgram``. Its inputs:
    ``input_ids [1, S]``, ``position_ids [1, S]``, then per layer ``key_cache_<i>``, ``value_cache_<i>``
    int8 ``[num_blocks, block_size, kv_heads, head_dim]``, then ``block_tables`` int32 ``[1, max_blocks]``,
    ``context_lens`` int32 ``[1]``, ``slot_mapping`` int64 ``[S]``, ``query_start_loc`` int32 ``[2]``.
    """
    if block_size not in BLOCK_SIZES:
        raise QpassError(f"block_size={block_size} is not supported by the paged ops; choose one of {BLOCK_SIZES}")
    gm = _unlifted(program)
    sites = find_attention_sites(gm.graph)
    bad = next((s for s in sites if s.head_dim not in HEAD_DIMS), None)
    if bad is not None:
        raise QpassError(f"attention {bad.attention}: head_dim={bad.head_dim} is not supported by the paged ops "
                         f"(supported: {HEAD_DIMS}); keep the unlowered program for this model")
    lower = LowerPagedAttentionPass(sites, max_context)
    manager = PassManager([lower], run_checks_after_each_pass=verify)
    # verify_graph reads constants as attributes of the root module, which unlifted graphs nest; lint
    # here (before and after the pass), our invariants in verify_lowered after it.
    manager.add_checks(lambda g: g.graph.lint())
    try:
        manager(gm)
    except Exception as err:  # PassManager wraps what a pass raises; a refusal must reach the user as it is
        raise err.__cause__ if isinstance(err.__cause__, QpassError) else err
    if verify:
        verify_lowered(gm, len(sites))
    if lower.lowered != len(sites):
        raise QpassError(f"lowering rewrote {lower.lowered} of {len(sites)} attention sites; please report this model")
    seq = Dim("seq", min=1, max=max_context)
    blocks, width = Dim("num_blocks", min=1), Dim("max_blocks", min=1, max=max(2, -(-max_context // block_size)))
    example = _inputs(torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None],
                      [allocate_kv_cache(4, block_size, s.num_kv_heads, s.head_dim) for s in sites],
                      torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([4], dtype=torch.int32),
                      torch.arange(4), torch.tensor([0, 4], dtype=torch.int32))
    cache_dims = [{0: blocks}] * (2 * len(sites))
    dynamic = ({1: seq}, {1: seq}, *cache_dims, {1: width}, None, {0: seq}, None)
    with torch.no_grad():
        return torch.export.export(gm, example, dynamic_shapes=dynamic, strict=False)


def _unlifted(program: ExportedProgram) -> GraphModule:
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


def _inputs(input_ids, position_ids, caches, block_tables, context_lens, slot_mapping, query_start_loc) -> tuple:
    return (input_ids, position_ids, *(t for pair in caches for t in pair), block_tables, context_lens, slot_mapping,
            query_start_loc)


def decoder_layout(program: ExportedProgram) -> dict:
    """``num_layers``, ``block_size``, ``num_kv_heads``, ``head_dim``, ``max_context`` of a lowered program."""
    names = list(program.graph_signature.user_inputs)
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    key_caches = [n for n in names if n.startswith("key_cache_")]
    if names[:2] != ["input_ids", "position_ids"] or not key_caches or names[-len(PAGING_INPUTS):] != list(PAGING_INPUTS):
        raise QpassError(f"the program's inputs {names} are not those of a decoder lowered by qpass; recompile it with `qpass compile`")
    _, block_size, kv_heads, head_dim = placeholders[key_caches[0]].meta["val"].shape
    seq = placeholders["input_ids"].meta["val"].shape[1]
    max_context = int(program.range_constraints[seq.node.expr].upper) if isinstance(seq, torch.SymInt) else int(seq)
    return {"num_layers": len(key_caches), "block_size": int(block_size), "num_kv_heads": int(kv_heads),
            "head_dim": int(head_dim), "max_context": max_context}


def generate_lowered(program: ExportedProgram, prompt_ids, max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """Greedy decoding with the lowered program: prefill the prompt into a paged int8 cache, then feed
    one new token per step. Returns the new token ids (stops early after ``eos_token_id``)."""
    layout = decoder_layout(program)
    prompt = _prompt(prompt_ids)
    total = len(prompt) + max_new_tokens
    if total > layout["max_context"]:
        raise QpassError(f"{len(prompt)} prompt tokens + {max_new_tokens} new tokens exceed the {layout['max_context']} "
                         "tokens this program was lowered for; shorten the prompt or ask for fewer tokens")
    block_size = layout["block_size"]
    num_blocks = -(-total // block_size)
    caches = [allocate_kv_cache(num_blocks, block_size, layout["num_kv_heads"], layout["head_dim"])
              for _ in range(layout["num_layers"])]
    tables = BlockTables(BlockAllocator(num_blocks), block_size)
    module = program.module()
    tokens, new, start = prompt, [], 0
    with torch.no_grad():
        for _ in range(max_new_tokens):
            slot_mapping = tables.append_tokens(0, len(tokens))
            block_tables, context_lens = tables.tensors([0])
            logits = module(*_inputs(torch.tensor([tokens]), torch.arange(start, start + len(tokens))[None], caches,
                                     block_tables, context_lens, slot_mapping,
                                     torch.tensor([0, len(tokens)], dtype=torch.int32)))
            start += len(tokens)
            tokens = [int(logits[0, -1].argmax())]
            new += tokens
            if tokens[0] == eos_token_id:
                break
    return new


def generate_reference(program: ExportedProgram, prompt_ids, max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """Greedy decoding with the unlowered decoder program, recomputing the whole sequence each step."""
    module = program.module()
    ids, new = _prompt(prompt_ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = module(torch.tensor([ids + new]), torch.arange(len(ids) + len(new))[None])
            new.append(int(logits[0, -1].argmax()))
            if new[-1] == eos_token_id:
                break
    return new


def _prompt(prompt_ids) -> list[int]:
    ids = prompt_ids.flatten().tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
    if not ids:
        raise QpassError("the prompt is empty; give at least one token")
    return [int(i) for i in ids]


def load_decoder(out_dir) -> tuple[ExportedProgram, object]:
    """The lowered decoder and the tokenizer from a directory written by ``qpass compile -o``."""
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    path = out_dir / DECODER_FILE
    if not path.is_file():
        reason = ""
        if (out_dir / "report.json").is_file():
            skipped = json.loads((out_dir / "report.json").read_text(encoding="utf-8")).get("decoder", {}).get("skipped")
            reason = f" (compile skipped it: {skipped})" if skipped else ""
        raise QpassError(f"{out_dir}: no {DECODER_FILE}{reason}; give a directory written by `qpass compile -o` "
                         "for a model whose attention the paged int8 ops support")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(out_dir / "tokenizer"))
    except (OSError, ValueError) as err:
        raise QpassError(f"{out_dir}: cannot load tokenizer/ ({err}); recompile into a fresh directory") from err
    return torch.export.load(str(path)), tokenizer
