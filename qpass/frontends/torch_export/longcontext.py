"""The long-context check's runs on torch.export (:mod:`qpass.core.longcontext` judges them): the quantized decoder
through its paged int8 cache, prefill in chunks then token by token, and the float model with its own cache.

Each scorer maps token ids ``[T]`` to ``(nll float64 [T - 1], hit bool [T - 1])``: index ``t - 1`` is the loss of
token ``t`` given the tokens before it, and whether greedy decoding would have given it.
"""

import inspect

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qpass.core.errors import QpassError
from qpass.frontends.torch_export.decoder import build_decoder, decoder_layout
from qpass.frontends.torch_export.pipeline import decoder_inputs, layer_caches
from qpass.runtime.paged_cache import BlockAllocator, BlockTables

PREFILL_CHUNK = 1024  # tokens per prefill call: bounds the scores the folded CPU op holds ([heads, chunk, 2048])


def paged_decoder(loaded, context: int, model: torch.nn.Module | None):
    """The lowered decoder that runs ``context`` tokens: the directory's own (``decoder.pt2``) where it was lowered
    for that many, else lowered again from the directory's recipe and a model: the one it holds (MindIE) or
    ``model``, the float model it was compiled from (the same passes as ``qpass compile``). Returns
    ``(program, how)``, ``how`` a few words for the report."""
    if loaded.decoder is not None and decoder_layout(loaded.decoder)["max_context"] >= context:
        return loaded.decoder, "the saved decoder.pt2"
    if loaded.recipe is None:
        raise QpassError(
            f"--context: this {loaded.format} directory quantizes no attention (W8A8 alone keeps the KV cache in "
            "float): there is no int8 cache to check; compile with --kv-int8 or --fa-quant"
        )
    source = loaded.model if loaded.model is not None else model
    if source is None:
        saved = decoder_layout(loaded.decoder)["max_context"] if loaded.decoder is not None else 0
        raise QpassError(
            f"--context {context}: the directory's decoder takes {saved} tokens; lowering one for more needs the float "
            "model it was compiled from: give --float MODEL"
        )
    _, lowered = build_decoder(source, loaded.recipe, max_context=context)
    return lowered, "a decoder lowered again from the recipe for this context"


def paged_scores(program, ids: list[int], prefill: int, desc: str = "paged") -> tuple[torch.Tensor, torch.Tensor]:
    """Score ``ids`` with the lowered ``program``: tokens ``0 .. prefill - 1`` written to a fresh paged int8 cache
    by prefill calls of at most :data:`PREFILL_CHUNK` tokens (each attending, through the paged prefill op, to the
    cache written so far), then tokens ``prefill .. T - 2`` one call each, as decoding does."""
    layout = decoder_layout(program)
    total = len(ids)
    if total > layout["max_context"]:
        raise QpassError(f"{total} tokens exceed the {layout['max_context']} this decoder was lowered for")
    if not 1 <= prefill <= total - 1:
        raise QpassError(f"prefill {prefill}: must be 1 .. {total - 1} for {total} tokens")
    block_size = layout["block_size"]
    num_blocks = -(-total // block_size)
    dynamic = layout["kv_cache"] == "dynamic"
    caches = [
        layer_caches(num_blocks, block_size, layout["num_kv_heads"], layout["head_dim"], dynamic)
        for _ in range(layout["num_layers"])
    ]
    tables = BlockTables(BlockAllocator(num_blocks), block_size)
    module = program.module()
    steps = [(a, min(a + PREFILL_CHUNK, prefill)) for a in range(0, prefill, PREFILL_CHUNK)]
    steps += [(t, t + 1) for t in range(prefill, total - 1)]
    targets = torch.tensor(ids[1:])
    nll, hit = torch.empty(total - 1, dtype=torch.float64), torch.empty(total - 1, dtype=torch.bool)
    with torch.no_grad():
        for a, b in tqdm(steps, desc=desc, unit="call", leave=False, disable=None):
            slot_mapping = tables.append_tokens(0, b - a)
            block_tables, context_lens = tables.tensors([0])
            logits = module(
                *decoder_inputs(
                    torch.tensor([ids[a:b]]),
                    torch.arange(a, b)[None],
                    caches,
                    block_tables,
                    context_lens,
                    slot_mapping,
                    torch.tensor([0, b - a], dtype=torch.int32),
                )
            )
            nll[a:b], hit[a:b] = _judge(logits[0], targets[a:b])
    return nll, hit


def float_scores(model: torch.nn.Module, ids: list[int], desc: str = "float") -> tuple[torch.Tensor, torch.Tensor]:
    """Score ``ids`` with the float ``model`` as its own framework runs it: chunks of :data:`PREFILL_CHUNK` tokens
    on its own (float) KV cache, which gives the same logits as one forward without holding ``[T, vocab]``."""
    from transformers import DynamicCache

    total = len(ids)
    targets = torch.tensor(ids[1:])
    nll, hit = torch.empty(total - 1, dtype=torch.float64), torch.empty(total - 1, dtype=torch.bool)
    # the cache grows in place; transformers 5 renamed the argument past_key_values to cache
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = {name: DynamicCache()}
    with torch.no_grad():
        for a in tqdm(range(0, total - 1, PREFILL_CHUNK), desc=desc, unit="chunk", leave=False, disable=None):
            b = min(a + PREFILL_CHUNK, total - 1)
            logits = model(input_ids=torch.tensor([ids[a:b]]), use_cache=True, **cache).logits
            nll[a:b], hit[a:b] = _judge(logits[0], targets[a:b])
    return nll, hit


def max_positions(model: torch.nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _judge(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.float()
    return F.cross_entropy(logits, targets, reduction="none").double(), logits.argmax(-1) == targets
