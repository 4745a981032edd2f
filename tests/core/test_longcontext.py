"""The long-context check's frontend-neutral half: documents, the passkey grid, buckets, intervals and warnings."""

import math

import pytest
import torch

from qpass.core import corpus, longcontext
from qpass.core.errors import QpassError


@pytest.mark.parametrize("context", [128, 1000, 8192, 32768])
def test_buckets_cover_every_target_position_once(context):
    spans = longcontext.buckets(context)
    assert spans[0][0] == 1 and spans[-1][1] == context
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert sum(hi - lo for lo, hi in spans) == context - 1


def test_buckets_at_8k_are_the_issues():
    assert longcontext.buckets(8192) == [(1, 1024), (1024, 2048), (2048, 4096), (4096, 8192)]


def test_bucket_table_pairs_tokens_and_flags_a_late_increase():
    context, g = 256, torch.Generator().manual_seed(0)
    base = [torch.rand(context - 1, generator=g, dtype=torch.float64) * 4 for _ in range(3)]
    same = longcontext.bucket_table(context, base, [b + 0.01 for b in base])
    assert all(abs(r["increase"] - 0.01) < 1e-12 and r["interval"] < 1e-9 for r in same)
    assert sum(r["tokens"] for r in same) == 3 * (context - 1)
    assert math.isclose(same[0]["ppl_increase_pct"], math.expm1(0.01) * 100)
    assert longcontext.late_position_warning(same) is None
    noise = [torch.randn(context - 1, generator=g, dtype=torch.float64) * 0.01 for _ in range(3)]
    late = [b + n + (torch.arange(context - 1) >= 127).double() * 0.05 for b, n in zip(base, noise)]
    rows = longcontext.bucket_table(context, base, late)
    d = torch.cat([n[127:255] for n in noise]) + 0.05
    assert math.isclose(rows[-1]["increase"], float(d.mean()))
    assert math.isclose(rows[-1]["interval"], 1.959964 * float(d.std()) / math.sqrt(d.numel()))
    warning = longcontext.late_position_warning(rows)
    assert warning is not None and "128-256" in warning and "95% interval" in warning and "--window" not in warning
    hint = longcontext.late_position_warning(rows, calibrated_window=64)
    assert hint.endswith("(ranges calibrated to hold 64 tokens: recalibrate with --max-context 256, or --window 256)")
    assert longcontext.late_position_warning(rows, calibrated_window=256) == warning
    # within the difference's interval: no warning, though beyond the last bucket's own
    rows[-1]["increase"] = rows[0]["increase"] + 1.2 * rows[-1]["interval"]
    rows[0]["interval"] = rows[-1]["interval"]
    assert longcontext.late_position_warning(rows) is None


def test_retrieval_table_is_complete_and_warns_where_quantized_loses_what_float_keeps(smollm2_tokenizer):
    grid = longcontext.passkey_prompts(smollm2_tokenizer, 512)
    assert [(d, n) for d, n, _, _ in grid] == [(d, n) for n in (128, 256, 512) for d in longcontext.DEPTHS]
    float_hits = [True] * len(grid)
    quant_hits = [True] * (len(grid) - 1) + [False]
    table = longcontext.retrieval_table(grid, float_hits, quant_hits)
    assert len(table["cells"]) == 9 and table["lengths"]["512"] == {"float": 1.0, "quant": 2 / 3}
    assert "512 tokens depth 90%" in longcontext.retrieval_warning(table)
    none = longcontext.retrieval_table(grid, [False] * 9, [False] * 9)
    assert longcontext.retrieval_warning(none) is None and "no length" in longcontext.retrieval_note(none)
    short = longcontext.retrieval_table(grid, [True] * 3 + [False] * 6, [True] * 3 + [False] * 6)
    assert longcontext.retrieval_note(short) == "the float model retrieves at 128 tokens and at none of 256, 512"
    # how surely each retrieves: the least probability of a key token, in the cells and in the warning
    sure = longcontext.retrieval_table(grid, float_hits, quant_hits, [0.9] * 8 + [0.41234], [0.8] * 8 + [0.35])
    assert sure["cells"][-1] | {"key": None} == {
        "depth": 0.9,
        "length": 512,
        "key": None,
        "float": True,
        "quant": False,
        "float_p": 0.4123,
        "quant_p": 0.35,
    }
    assert longcontext.retrieval_warning(sure).endswith(
        "512 tokens depth 90% (key token at least p 0.41 float, 0.35 quantized)"
    )


def test_passkey_prompts_hold_the_key_at_its_depth_and_judge_its_tokens(smollm2_tokenizer):
    for depth, length, key, seq in longcontext.passkey_prompts(smollm2_tokenizer, 1024):
        assert abs(len(seq.ids) - length) <= 16
        assert smollm2_tokenizer.decode(seq.ids[seq.judged.start :]).strip() == key
        text = smollm2_tokenizer.decode(seq.ids[: seq.judged.start])
        assert text.endswith("The pass key is") and text.count(key) == 2
        filler = len(text) - len(longcontext.INTRO) - len(longcontext.NEEDLE.format(key=key))
        at = (text.index(f"The pass key is {key}") - len(longcontext.INTRO)) / (filler - len(longcontext.QUESTION))
        assert abs(at - depth) < 0.1


def test_documents_come_from_modules_calibration_never_sees(smollm2_tokenizer):
    docs = longcontext.documents(smollm2_tokenizer, 2048, 3)
    assert [len(d.ids) for d in docs] == [2048] * 3 and all(d.judged == range(1, 2048) for d in docs)
    first = smollm2_tokenizer.decode(docs[0].ids)
    assert first.startswith(corpus.eval_sources()[0][:200])
    assert not set(corpus.CALIBRATION_MODULES) & set(corpus.EVAL_PROSE_MODULES + corpus.EVAL_CODE_MODULES)
    text = "word " * 3000
    pieces = longcontext.documents(smollm2_tokenizer, 1000, 2, text)
    ids = smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert pieces[0].ids + pieces[1].ids == ids[:2000]  # consecutive pieces of the text
    with pytest.raises(QpassError, match="--documents 4 of --context 1000: --eval has 3001 tokens, 3 such"):
        longcontext.documents(smollm2_tokenizer, 1000, 4, text)


@pytest.mark.parametrize("bad", [0, -5, 127, 2.5, True, "512"])
def test_a_context_that_is_no_count_of_tokens_is_refused(bad):
    with pytest.raises(QpassError, match="must be an integer of at least 128"):
        longcontext.check_context(bad, None)


def test_a_context_beyond_the_model_is_refused_naming_its_limit():
    with pytest.raises(QpassError, match="--long-context 9000: beyond the 8192 positions"):
        longcontext.check_context(9000, 8192, "--long-context")
    longcontext.check_context(8192, 8192)


@pytest.mark.parametrize(
    ("options", "window"),
    [
        ({"kv_cache": "static"}, 64),
        ({"kv_cache": "static", "max_context": 2048}, 2048),  # --max-context: the ranges hold 2,048 tokens
        ({"kv_cache": "static", "max_context": 32}, 64),
        ({"fa_quant": True}, 64),
        ({"w8a8": "static", "kv_cache": "dynamic"}, 64),
        ({"kv_cache": "dynamic"}, None),  # nothing calibrated: no --window advice
        ({"kv_cache": "dynamic", "w8a8": "dynamic"}, None),
    ],
)
def test_the_window_hint_names_only_a_window_that_calibrated_ranges(options, window):
    from qpass.api import _calibrated_window
    from qpass.core.config import QuantConfig
    from qpass.core.recipe import CALIBRATED_WITH, Recipe

    recipe = Recipe(QuantConfig(**options), (), stats={CALIBRATED_WITH: {"window": 64, "windows": 4}})
    assert _calibrated_window(recipe) == window
    assert _calibrated_window(None) is None
