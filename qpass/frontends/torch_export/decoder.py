"""Greedy text generation from a paged int8 KV cache: build the lowered decoder program and run it.

The decoder program takes ``(input_ids [1, S], position_ids [1, S])`` with S dynamic, so one
program serves prefill (S = prompt length) and decode (S = 1). Lowered, it also takes the per-layer
int8 caches (with their scale caches for ``--kv-int8 dynamic``) and the paging tensors (see
``passes/fx/lower_paged_attention.py``) and writes the new tokens' K/V into the caches in place.
"""

import torch
from torch.export import Dim, ExportedProgram

from qpass.core.errors import QpassError
from qpass.core.recipe import Recipe, geometry
from qpass.frontends.torch_export.capture import param_names
from qpass.frontends.torch_export.pipeline import (
    BLOCK_SIZE,
    MAX_CONTEXT,
    decoder_inputs,
    layer_caches,
    lower_program,
    quantize_program,
)
from qpass.passes.fx.find_attention_sites import find_attention_sites
from qpass.passes.fx.lower_paged_attention import PAGING_INPUTS
from qpass.runtime.paged_cache import BlockAllocator, BlockTables
from qpass.runtime.paged_checks import HEAD_DIMS

DECODER_FILE = "decoder.pt2"


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
            return torch.export.export(
                TokensAndPositions(model), example, dynamic_shapes=({1: seq}, {1: seq}), strict=False
            )
    except Exception as err:  # torch.export raises many types; the user needs to know capture failed
        raise QpassError(
            f"decoder capture: torch.export could not trace {type(model).__name__} with position_ids "
            f"({type(err).__name__}: {str(err).splitlines()[0]}); qpass supports decoder-only Hugging Face causal LMs"
        ) from err


def build_decoder(
    model: torch.nn.Module,
    recipe: Recipe,
    block_size: int = BLOCK_SIZE,
    max_context: int = MAX_CONTEXT,
    verify: bool = True,
) -> tuple[ExportedProgram, ExportedProgram]:
    """The decoder with Q/DQ (the reference: recomputes the whole sequence) and the same lowered to paged ops.

    The pipeline, in order: capture the decoder; find its attention sites; insert Q/DQ with ``recipe``
    (:func:`quantize_program`); lower each site, through the generic op, to the cache write and paged
    attention (:func:`lower_program`); re-export.
    """
    max_context = min(max_context, getattr(model.config, "max_position_embeddings", None) or max_context)
    program = capture_decoder(model, max_context)
    sites = find_attention_sites(program.graph, param_names(program))
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


def decoder_layout(program: ExportedProgram) -> dict:
    """``num_layers``, ``block_size``, ``num_kv_heads``, ``head_dim``, ``max_context`` and ``kv_cache`` (``static``, or
    ``dynamic`` when each layer also takes scale caches) of a lowered program."""
    names = list(program.graph_signature.user_inputs)
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    key_caches = [n for n in names if n.startswith("key_cache_")]
    if (
        names[:2] != ["input_ids", "position_ids"]
        or not key_caches
        or names[-len(PAGING_INPUTS) :] != list(PAGING_INPUTS)
    ):
        raise QpassError(
            f"the program's inputs {names} are not those of a decoder lowered by qpass; "
            "recompile it with `qpass compile`"
        )
    _, block_size, kv_heads, head_dim = placeholders[key_caches[0]].meta["val"].shape
    seq = placeholders["input_ids"].meta["val"].shape[1]
    max_context = int(program.range_constraints[seq.node.expr].upper) if isinstance(seq, torch.SymInt) else int(seq)
    return {
        "num_layers": len(key_caches),
        "block_size": int(block_size),
        "num_kv_heads": int(kv_heads),
        "head_dim": int(head_dim),
        "max_context": max_context,
        "kv_cache": "dynamic" if any(n.startswith("key_scale_cache_") for n in names) else "static",
    }


def generate_lowered(
    program: ExportedProgram, prompt_ids, max_new_tokens: int, eos_token_id: int | None = None
) -> list[int]:
    """Greedy decoding with the lowered program: prefill the prompt into a paged int8 cache (static or dynamic,
    as the program takes it), then feed one new token per step. Returns the new token ids (stops early after
    ``eos_token_id``)."""
    layout = decoder_layout(program)
    prompt = _prompt(prompt_ids)
    total = len(prompt) + max_new_tokens
    if total > layout["max_context"]:
        raise QpassError(
            f"{len(prompt)} prompt tokens + {max_new_tokens} new tokens exceed the {layout['max_context']} "
            "tokens this program was lowered for; shorten the prompt or ask for fewer tokens"
        )
    block_size = layout["block_size"]
    num_blocks = -(-total // block_size)
    caches = [
        layer_caches(
            num_blocks, block_size, layout["num_kv_heads"], layout["head_dim"], layout["kv_cache"] == "dynamic"
        )
        for _ in range(layout["num_layers"])
    ]
    tables = BlockTables(BlockAllocator(num_blocks), block_size)
    module = program.module()
    tokens, new, start = prompt, [], 0
    with torch.no_grad():
        for _ in range(max_new_tokens):
            slot_mapping = tables.append_tokens(0, len(tokens))
            block_tables, context_lens = tables.tensors([0])
            logits = module(
                *decoder_inputs(
                    torch.tensor([tokens]),
                    torch.arange(start, start + len(tokens))[None],
                    caches,
                    block_tables,
                    context_lens,
                    slot_mapping,
                    torch.tensor([0, len(tokens)], dtype=torch.int32),
                )
            )
            start += len(tokens)
            tokens = [int(logits[0, -1].argmax())]
            new += tokens
            if tokens[0] == eos_token_id:
                break
    return new


def generate_reference(
    program: ExportedProgram, prompt_ids, max_new_tokens: int, eos_token_id: int | None = None
) -> list[int]:
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


def generate_with_model(
    model: torch.nn.Module, prompt_ids, max_new_tokens: int, eos_token_id: int | None = None
) -> list[int]:
    """Greedy decoding with the model's own float KV cache (a W8A8-only model: no attention quantization)."""
    ids = torch.tensor([_prompt(prompt_ids)])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=eos_token_id,
        )
    return out[0, ids.shape[1] :].tolist()
