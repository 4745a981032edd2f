"""Calibration and evaluation text: readers with one-line errors, token windows, and whether calibration
windows are too small or too repetitive to calibrate on.

Calibration files are ``.jsonl`` (one object a line, the text under ``inputs_pretokenized`` as in
BoolQ, or under ``text``) or plain text; evaluation files are plain text.
"""

import json
import os
from pathlib import Path

import torch

from qpass.core.errors import QpassError

JSONL_FIELDS = ("inputs_pretokenized", "text")


def read_samples(path: str | Path, flag: str = "--calib") -> list[str]:
    """The samples of a calibration file: one per ``.jsonl`` line, or the whole text of any other file."""
    path = Path(path)
    text = read_text(path, flag)
    if path.suffix != ".jsonl":
        return [text]
    fix = f"each line must be an object with an {JSONL_FIELDS[0]!r} or {JSONL_FIELDS[1]!r} field"
    samples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise QpassError(f"{flag}: {path.name} line {number} is not JSON ({err.msg}); {fix}") from None
        if not isinstance(obj, dict):
            raise QpassError(f"{flag}: {path.name} line {number} is a JSON {type(obj).__name__}, not an object; {fix}")
        field = next((f for f in JSONL_FIELDS if f in obj), None)
        if field is None:
            raise QpassError(
                f"{flag}: {path.name} line {number} has no {JSONL_FIELDS[0]!r} or {JSONL_FIELDS[1]!r} field; {fix}"
            )
        if not isinstance(obj[field], str) or not obj[field].strip():
            raise QpassError(f"{flag}: {path.name} line {number}: {field!r} is not a non-empty string; {fix}")
        samples.append(obj[field])
    if not samples:
        raise QpassError(f"{flag}: {path.name} has no samples; {fix}")
    return samples


def read_text(path: str | Path, flag: str = "--eval") -> str:
    """The whole of a UTF-8 text file, refusing missing, unreadable, non-UTF-8 and empty files."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise QpassError(f"{flag}: {path} does not exist; give the path of a UTF-8 text file") from None
    except OSError as err:
        raise QpassError(f"{flag}: cannot read {path} ({err.strerror}); check the path and its permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise QpassError(
            f"{flag}: {path.name} is not UTF-8 (byte {err.start}, line {line}); convert it with `iconv -t utf-8`"
        ) from None
    if not text.strip():
        raise QpassError(f"{flag}: {path.name} is empty; give a file with text in it")
    return text


def check_texts_apart(calib, eval, reusing_recipe: bool) -> None:
    """Refuse calibration text that would be silently unread (``--calib`` beside ``--recipe``, which reuses a
    calibration) and an evaluation file that is the calibration file (its perplexity would be measured on the text
    the ranges were fitted to)."""
    if reusing_recipe and calib is not None:
        raise QpassError(
            "--calib: --recipe reuses a calibration, so nothing would read this text; drop --calib, or drop --recipe "
            "to calibrate on it"
        )
    if isinstance(calib, (str, Path)) and isinstance(eval, (str, Path)):
        try:
            same = os.path.samefile(calib, eval)  # through links, hard ones too
        except OSError:  # one of them is missing: its reader says so
            same = False
        if same:
            raise QpassError(
                f"--eval {eval}: is the calibration file; evaluate on text not used for calibration (or drop --eval "
                "to measure on held-out calibration windows)"
            )


def check_window(window: int, positions, model, source: str = "max_position_embeddings") -> None:
    """Refuse, before any run, a ``--window`` longer than the ``positions`` the model learnt (``source`` says where
    the model gives them); None or no number: nothing to check."""
    if isinstance(positions, int) and window > positions:
        raise QpassError(
            f"--window {window}: longer than the {positions} positions of MODEL {model} ({source}); "
            f"use --window {positions} or less"
        )


def token_windows(
    tokenizer,
    texts: list[str],
    window: int,
    max_windows: int | None,
    flag: str,
    fix: str = "give more text or a smaller --window",
) -> torch.Tensor:
    """``[N, window]`` token ids: the texts tokenized, joined with EOS, cut into whole windows.

    Takes at most ``max_windows`` windows, spread evenly over the text so that a long file is sampled
    throughout. Raises when the text does not fill one window (saying ``fix``).
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    count = len(ids) // window
    if count == 0:
        raise QpassError(f"{flag}: the text is {len(ids)} tokens, shorter than one window of {window}; {fix}")
    windows = torch.tensor(ids[: count * window], dtype=torch.long).view(count, window)
    if max_windows is not None and count > max_windows:
        pick = torch.linspace(0, count - 1, max_windows).round().long()
        windows = windows[pick]
    return windows


MIN_CALIB_TOKENS = (
    2048  # below this, a min-max range leaves ~2/N > 1e-3 of fresh values outside it (qpass.core.saturation)
)
REPEAT_NGRAM = 8  # a token sequence this long that occurs again is a repeat (natural text and code: under 10%)
MAX_REPEATED = 0.5  # more than this share of repeats: the text is a few passages over and over


def repeated_fraction(windows: torch.Tensor, n: int = REPEAT_NGRAM) -> float:
    """The share of the ``n``-token sequences of ``windows [N, W]`` (read in order as one text) that repeat an
    earlier one: 0 for text that never repeats itself, ~0.9 for ten copies of one sentence."""
    ids = windows.flatten().tolist()
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def calibration_text_warning(windows: torch.Tensor, feeds: str) -> str | None:
    """One line saying why ``windows [N, W]`` are too small or too repetitive to calibrate ``feeds`` (what the
    ranges are for, e.g. "FAQuant q/k/v at 30 attention sites") and what to do; None when they are neither."""
    tokens, repeated = windows.numel(), repeated_fraction(windows)
    problems = []
    if tokens < MIN_CALIB_TOKENS:
        problems.append(f"only {tokens} tokens (fewer than {MIN_CALIB_TOKENS})")
    if repeated > MAX_REPEATED:
        problems.append(
            f"{repeated:.0%} of its {REPEAT_NGRAM}-token sequences repeat an earlier one (more than {MAX_REPEATED:.0%})"
        )
    if not problems:
        return None
    return (
        f"calibration text: {' and '.join(problems)}, too little varied text for the int8 ranges of {feeds}: "
        f"text unlike it will be clipped; calibrate on at least {MIN_CALIB_TOKENS} tokens of varied text like the "
        "deployment text (--calib, --calib-samples; without --calib qpass uses its built-in standard-library corpus)"
    )
