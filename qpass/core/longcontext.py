"""The long-context check: next-token loss by position bucket over long real documents, and passkey retrieval at
several depths and lengths, float and quantized side by side (``qpass eval --context N``,
``qpass compile --long-context N``).

Frontend-neutral: it builds the token sequences and judges the scores a frontend returns, one
``(nll float64 [T - 1], hit bool [T - 1])`` per sequence (``hit``: the greedy token is the next one). How a frontend
runs the quantized program (through its paged int8 cache, prefill then token by token) is its own business.
"""

import math
import random
import time
from dataclasses import dataclass

import torch

from qpass.core import corpus
from qpass.core.errors import QpassError

DOCUMENTS = 4  # long documents, by default
MIN_CONTEXT = 128  # below this the passkey prompt has no room for filler
DECODE_TOKENS = 128  # the last tokens of each document, fed one at a time through the cache (at most a quarter)
DEPTHS = (0.1, 0.5, 0.9)  # where the passkey sits in the filler, as a fraction of it
Z95 = 1.959964  # two-sided 95 % of the normal distribution
SEED = 27

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class Sequence:
    """Token ids to score and the positions (indices of predicted tokens, 1 .. T - 1) that are judged."""

    ids: list[int]
    judged: range  # target positions: every one for a document, the answer's for a passkey prompt


def check_context(context: int, limit: int | None, flag: str = "--context") -> None:
    """Refuse a context that is not an integer of at least :data:`MIN_CONTEXT`, or beyond the model's ``limit``."""
    if isinstance(context, bool) or not isinstance(context, int) or context < MIN_CONTEXT:
        raise QpassError(f"{flag} {context}: must be an integer of at least {MIN_CONTEXT} tokens")
    if limit is not None and context > limit:
        raise QpassError(
            f"{flag} {context}: beyond the {limit} positions the model takes (max_position_embeddings); "
            f"give at most {limit}"
        )


def check_documents(count: int) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise QpassError(f"--documents {count}: must be a positive integer")


def buckets(context: int) -> list[tuple[int, int]]:
    """Position buckets ``[lo, hi)`` of target positions 1 .. context - 1, doubling: for 8,192 tokens 1-1k, 1k-2k,
    2k-4k, 4k-8k (the first bucket starts at 1: position 0 is predicted by nothing)."""
    edges = [context // 8, context // 4, context // 2]
    return list(zip([1, *edges], [*edges, context]))


def decode_tokens(context: int) -> int:
    """How many of a document's last tokens are fed one at a time (the rest is prefilled)."""
    return min(DECODE_TOKENS, context // 4)


def documents(tokenizer, context: int, count: int, text: str | None = None) -> list[Sequence]:
    """``count`` documents of ``context`` tokens each. From ``text`` (an ``--eval`` file): its consecutive pieces.
    Otherwise real documents the built-in calibration never sees: the sources of the standard-library modules kept for
    evaluation (:data:`corpus.EVAL_PROSE_MODULES`, :data:`corpus.EVAL_CODE_MODULES`), each document one module, or
    consecutive modules joined where one is shorter than ``context``. Refused in one line when there is too little."""
    if text is not None:
        ids = _encode(tokenizer, text)
        pieces = [ids[i : i + context] for i in range(0, len(ids) - context + 1, context)][:count]
        where = f"--eval has {len(ids)} tokens"
    else:
        pieces, current = [], []
        for source in corpus.eval_sources():
            current += _encode(tokenizer, source)
            if len(current) >= context:
                pieces.append(current[:context])
                current = []
            if len(pieces) == count:
                break
        where = "the standard library's evaluation modules hold too few tokens"
    if len(pieces) < count:
        raise QpassError(
            f"--documents {count} of --context {context}: {where}, {len(pieces)} such document(s); "
            "ask for fewer or shorter documents, or give a longer --eval file"
        )
    return [Sequence(p, range(1, context)) for p in pieces]


def passkey_lengths(context: int) -> list[int]:
    """Prompt lengths of the retrieval grid: a quarter, half and all of ``context``, those of at least
    :data:`MIN_CONTEXT` tokens."""
    return [n for n in (context // 4, context // 2, context) if n >= MIN_CONTEXT]


def passkey_prompts(tokenizer, context: int) -> list[tuple[float, int, str, Sequence]]:
    """The retrieval grid: ``(depth, length, key, sequence)`` for each depth in :data:`DEPTHS` and length in
    :func:`passkey_lengths`. A sequence is the instruction, real prose as filler (the evaluation modules'
    docstrings) with the passkey sentence at ``depth`` of it, the question, and the key's tokens; it is judged on the
    key's tokens (retrieved: greedy decoding gives every one of them). The same keys for the same ``context``."""
    rng = random.Random(SEED)
    filler = _encode(tokenizer, corpus.eval_prose())
    grid = []
    for length in passkey_lengths(context):
        for depth in DEPTHS:
            key = str(rng.randrange(10000, 100000))
            answer = _encode(tokenizer, f" {key}")
            fixed = len(_encode(tokenizer, INTRO + NEEDLE.format(key=key) + QUESTION)) + len(answer) + 1
            room = length - fixed - 8  # joins may tokenize a few tokens longer
            if room < 8:
                raise QpassError(
                    f"--context {context}: too short for the passkey prompt ({fixed} tokens without filler); "
                    f"give at least {4 * (fixed + 16)}"
                )
            if room > len(filler):
                raise QpassError(
                    f"--context {context}: the filler prose holds {len(filler)} tokens, fewer than the {room} "
                    "this length needs"
                )
            cut = int(depth * room)
            before = tokenizer.decode(filler[:cut])
            after = tokenizer.decode(filler[cut:room])
            prompt = _encode(tokenizer, INTRO + before + NEEDLE.format(key=key) + after + QUESTION, special=True)
            ids = prompt + answer
            grid.append((depth, length, key, Sequence(ids, range(len(prompt), len(ids)))))
    return grid


def _encode(tokenizer, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def measure(
    tokenizer,
    context: int,
    count: int,
    text: str | None,
    float_score,
    quant_score,
    calibrated_window: int | None = None,
) -> dict:
    """The check's section of a report: :func:`documents` scored by both models (the quantized one prefilled but for
    the last :func:`decode_tokens`, which it decodes one at a time), the :func:`passkey_prompts` grid (the quantized
    one prefilled with the prompt, then decoding the key), judged by :func:`bucket_table` and
    :func:`retrieval_table`, with the warnings. ``float_score(ids, desc)`` and ``quant_score(ids, prefill, desc)``
    return ``(nll float64 [T - 1], hit bool [T - 1])``; ``calibrated_window``: the window the recipe was calibrated
    over, where it records one (the late-position warning then says so)."""
    docs = documents(tokenizer, context, count, text)
    grid = passkey_prompts(tokenizer, context)  # refused now rather than after the documents
    timings = {}
    start = time.perf_counter()
    float_nll = [float_score(d.ids, f"float document {i + 1}/{count}")[0] for i, d in enumerate(docs)]
    timings["documents_float"] = time.perf_counter() - start
    start = time.perf_counter()
    prefill = context - decode_tokens(context)
    quant_nll = [quant_score(d.ids, prefill, f"quantized document {i + 1}/{count}")[0] for i, d in enumerate(docs)]
    timings["documents_quant"] = time.perf_counter() - start
    hits, least = {"float": [], "quant": []}, {"float": [], "quant": []}
    for kind in hits:
        start = time.perf_counter()
        for n, (depth, length, _, seq) in enumerate(grid):
            desc = f"{kind} passkey {n + 1}/{len(grid)}"
            nll, hit = float_score(seq.ids, desc) if kind == "float" else quant_score(seq.ids, seq.judged.start, desc)
            key = slice(seq.judged.start - 1, None)  # the scores of the key's tokens
            hits[kind].append(bool(hit[key].all()))
            least[kind].append(math.exp(-float(nll[key].max())))
        timings[f"retrieval_{kind}"] = time.perf_counter() - start
    section = {
        "context": context,
        "documents": count,
        "source": "--eval" if text is not None else "stdlib evaluation modules' sources",
        "decoded_tokens": decode_tokens(context),
        "interval": "paired 95% over tokens (normal approximation, documents pooled)",
        "buckets": bucket_table(context, float_nll, quant_nll),
        "retrieval": retrieval_table(grid, hits["float"], hits["quant"], least["float"], least["quant"]),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    if calibrated_window is not None:
        section["calibrated_window"] = calibrated_window
    late = late_position_warning(section["buckets"], calibrated_window)
    section["warnings"] = [w for w in (late, retrieval_warning(section["retrieval"])) if w]
    return section


# ---------------------------------------------------------------------------------------------
# Judging the scores
# ---------------------------------------------------------------------------------------------


def bucket_table(context: int, float_nll: list[torch.Tensor], quant_nll: list[torch.Tensor]) -> list[dict]:
    """Per bucket, over every document's target positions in it: the float and quantized mean NLL, the quantized
    increase (nats) with its paired 95 % interval over tokens (the token-by-token differences quantized - float,
    normal approximation; tokens are treated as independent, documents pooled), and the perplexity increase in %.
    ``*_nll``: one float64 ``[context - 1]`` per document, index ``t - 1`` the loss of target position ``t``."""
    rows = []
    for lo, hi in buckets(context):
        f = torch.cat([n[lo - 1 : hi - 1] for n in float_nll]).double()
        q = torch.cat([n[lo - 1 : hi - 1] for n in quant_nll]).double()
        d = q - f
        half = Z95 * float(d.std()) / math.sqrt(d.numel()) if d.numel() > 1 else float("nan")
        increase = float(d.mean())
        rows.append(
            {
                "positions": [lo, hi],
                "tokens": int(d.numel()),
                "nll_float": float(f.mean()),
                "nll_quant": float(q.mean()),
                "increase": increase,
                "interval": half,
                "ppl_increase_pct": math.expm1(increase) * 100.0,
            }
        )
    return rows


def late_position_warning(rows: list[dict], calibrated_window: int | None = None) -> str | None:
    """A warning when the quantized increase in the last bucket exceeds the first's by more than the 95 % interval of
    that difference (half-width ``sqrt(first's ** 2 + last's ** 2)``: the two buckets hold different tokens). Where
    the recipe's ranges were made to hold fewer tokens than the context (its calibration window, or its
    ``--max-context``), it says so: ranges fitted at positions 0 .. window - 1 need not hold Q and K after RoPE
    further on (SmolLM2: docs/benchmarks.md)."""
    first, last = rows[0], rows[-1]
    end = last["positions"][1]
    margin = math.hypot(first["interval"], last["interval"])
    if last["increase"] - first["increase"] <= margin + 1e-9:  # (rounding is no loss)
        return None
    return (
        f"long context: the quantized NLL increase at positions {_span(last)} ({last['increase']:+.4f} nats) exceeds "
        f"the first bucket's ({_span(first)}: {first['increase']:+.4f}) by more than the difference's 95% interval "
        f"(+/-{margin:.4f}); the int8 cache loses accuracy late in long contexts"
        + (
            f" (ranges calibrated to hold {calibrated_window} tokens: recalibrate with --max-context {end}, or "
            f"--window {end})"
            if calibrated_window is not None and calibrated_window < end
            else ""
        )
    )


def retrieval_table(
    grid: list[tuple[float, int, str, Sequence]],
    float_hits: list[bool],
    quant_hits: list[bool],
    float_least: list[float] | None = None,
    quant_least: list[float] | None = None,
):
    """``{"cells": [...], "lengths": {...}}``: each cell's depth, length, key and whether float and quantized
    retrieve it (and, given ``*_least``, the least probability each model gives one of the key's tokens: how surely it
    retrieves, ``float_p`` / ``quant_p``); per length, the accuracy of each over the depths."""
    cells = [
        {"depth": depth, "length": length, "key": key, "float": bool(f), "quant": bool(q)}
        for (depth, length, key, _), f, q in zip(grid, float_hits, quant_hits, strict=True)
    ]
    if float_least is not None and quant_least is not None:
        for cell, f, q in zip(cells, float_least, quant_least, strict=True):
            cell.update(float_p=float(f"{f:.4g}"), quant_p=float(f"{q:.4g}"))  # 4 significant digits
    lengths = {}
    for length in sorted({c["length"] for c in cells}):
        row = [c for c in cells if c["length"] == length]
        lengths[str(length)] = {
            "float": sum(c["float"] for c in row) / len(row),
            "quant": sum(c["quant"] for c in row) / len(row),
        }
    return {"depths": list(DEPTHS), "cells": cells, "lengths": lengths}


def retrieval_warning(table: dict) -> str | None:
    """A warning naming the cells where the float model retrieves the passkey and the quantized one does not."""
    lost = [c for c in table["cells"] if c["float"] and not c["quant"]]
    if not lost:
        return None
    where = ", ".join(f"{c['length']} tokens depth {c['depth']:.0%}{_sureness(c)}" for c in lost)
    return f"long context: the quantized model loses the passkey the float model retrieves at {where}"


def _sureness(cell: dict) -> str:
    """`` (key token at least p 0.41 float, 0.35 quantized)`` where the cell records it: a float model that retrieves
    by a thin margin loses the key to any small error."""
    if "float_p" not in cell:
        return ""
    return f" (key token at least p {cell['float_p']:.2f} float, {cell['quant_p']:.2f} quantized)"


def retrieval_note(table: dict) -> str:
    """Where the float model retrieves the passkey, in a line (a small model may retrieve at short lengths only)."""
    kept = [length for length, acc in table["lengths"].items() if acc["float"] > 0]
    if not kept:
        return "the float model retrieves the passkey at no length tried; retrieval says nothing about quantization"
    missed = [length for length, acc in table["lengths"].items() if acc["float"] == 0]
    return f"the float model retrieves at {', '.join(kept)} tokens" + (
        f" and at none of {', '.join(missed)}" if missed else ""
    )


def summary_lines(section: dict) -> list[str]:
    """The table for a terminal: NLL by position bucket, then retrieval by length."""
    lines = [
        f"  long context: {section['documents']} document{'s' if section['documents'] != 1 else ''} of "
        f"{section['context']} tokens "
        f"({section['source']}); quantized through {section['path']}",
        f"    {'positions':>12} {'tokens':>7} {'float':>8} {'quant':>8} {'increase (95% CI over tokens)':>30}",
    ]
    for row in section["buckets"]:
        lines.append(
            f"    {_span(row):>12} {row['tokens']:>7} {row['nll_float']:>8.4f} {row['nll_quant']:>8.4f} "
            f"{row['increase']:>+12.4f} +/-{row['interval']:.4f} ({row['ppl_increase_pct']:+.2f}% ppl)"
        )
    ret = section.get("retrieval")
    if ret:
        lines.append(
            "    passkey retrieved, float / quantized, over depths "
            + ", ".join(f"{d:.0%}" for d in ret["depths"])
            + ": "
            + "; ".join(f"{n} tokens {a['float']:.0%} / {a['quant']:.0%}" for n, a in ret["lengths"].items())
        )
        lines.append(f"    {retrieval_note(ret)}")
    return lines


def _span(row: dict) -> str:
    lo, hi = row["positions"]
    return f"{_k(lo)}-{_k(hi)}"


def _k(n: int) -> str:
    return f"{n / 1024:g}k" if n >= 1024 and n % 256 == 0 else str(n)


def plot(section: dict, path) -> None:
    """``path`` (PNG): the quantized NLL increase by position bucket with its interval (float's NLL under each); and the
    retrieval grid (depth x length), each cell marked by who retrieves the key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    rows = section["buckets"]
    x = range(len(rows))
    left.errorbar(
        x, [r["increase"] for r in rows], yerr=[r["interval"] for r in rows], marker="s", capsize=4, label="quantized"
    )
    left.axhline(0.0, color="grey", linewidth=1, label="float")
    left.set_xticks(list(x), [f"{_span(r)}\n{r['nll_float']:.3f}" for r in rows])
    left.set_xlabel("target position (float NLL below)")
    left.set_ylabel("NLL increase over float (nats, 95% CI)")
    left.set_title(f"NLL by position, {section['documents']} x {section['context']} tokens")
    left.grid(True, alpha=0.3)
    left.legend()
    ret = section.get("retrieval")
    if ret:
        lengths = sorted({c["length"] for c in ret["cells"]})
        code = {(True, True): 3, (True, False): 0, (False, True): 2, (False, False): 1}
        grid = [[code[(c["float"], c["quant"])] for c in ret["cells"] if c["length"] == n] for n in lengths]
        colors = matplotlib.colors.ListedColormap(["#d62728", "#bbbbbb", "#9ecae1", "#2ca02c"])
        right.imshow(list(map(list, zip(*grid))), cmap=colors, vmin=0, vmax=3, aspect="auto")
        right.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        right.set_yticks(range(len(ret["depths"])), [f"{d:.0%}" for d in ret["depths"]])
        right.set_xlabel("prompt length (tokens)")
        right.set_ylabel("passkey depth")
        right.set_title("passkey: green both, red float only, blue quant only, grey neither", fontsize=9)
    else:
        right.axis("off")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
