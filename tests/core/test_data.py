"""Calibration and evaluation readers: every bad input gets one line naming the problem and the fix; calibration
text too small or too repetitive to calibrate on is named too."""

import pytest
import torch

from qpass.core import corpus
from qpass.core.data import calibration_text_warning, read_samples, read_text, repeated_fraction, token_windows
from qpass.core.errors import QpassError


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def test_jsonl_fields_and_blank_lines(tmp_path):
    path = _write(tmp_path, "c.jsonl", '{"inputs_pretokenized": "a question?"}\n\n{"text": "some prose"}\n')
    assert read_samples(path) == ["a question?", "some prose"]


def test_plain_text_is_one_sample(tmp_path):
    assert read_samples(_write(tmp_path, "c.txt", "line one\nline two\n")) == ["line one\nline two\n"]


@pytest.mark.parametrize(
    "content,message",
    [
        ("", "is empty"),
        ('{"text": "ok"}\n{"text": "ok",\n', "line 2 is not JSON"),
        ('{"text": "ok"}\n{"prompt": "x"}\n', "line 2 has no 'inputs_pretokenized' or 'text' field"),
        ('["a list"]\n', "line 1 is a JSON list, not an object"),
        ('{"text": 5}\n', "line 1: 'text' is not a non-empty string"),
        ("\n\n", "is empty"),
    ],
)
def test_bad_jsonl(tmp_path, content, message):
    with pytest.raises(QpassError, match=message) as err:
        read_samples(_write(tmp_path, "c.jsonl", content))
    assert "\n" not in str(err.value)


def test_not_utf8_names_the_line(tmp_path):
    with pytest.raises(QpassError, match=r"not UTF-8 \(byte 7, line 2\).*iconv"):
        read_text(_write(tmp_path, "e.txt", b"line 1\n\xff\xfe"))


def test_missing_file(tmp_path):
    with pytest.raises(QpassError, match="does not exist"):
        read_text(tmp_path / "nope.txt", "--eval")


def test_windows_and_too_short_text(smollm2_tokenizer):
    windows = token_windows(smollm2_tokenizer, [corpus.eval_prose()], 128, 5, "--eval")
    assert windows.shape == (5, 128)
    with pytest.raises(QpassError, match="shorter than one window of 128"):
        token_windows(smollm2_tokenizer, ["too short"], 128, None, "--eval")


def test_corpus_keeps_evaluation_apart_from_calibration():
    calib = set(corpus.CALIBRATION_MODULES)
    assert not calib & set(corpus.EVAL_PROSE_MODULES) and not calib & set(corpus.EVAL_CODE_MODULES)
    assert corpus.calibration_samples() == corpus.calibration_samples()
    assert len(corpus.eval_prose()) > 50_000 and len(corpus.eval_code()) > 50_000


SENTENCE = "The quick brown fox jumps over the lazy dog while the farmer watches from the porch."


def test_repeated_fraction_counts_repeated_sequences():
    assert repeated_fraction(torch.arange(64).view(2, 32)) == 0.0
    # 0..9 four times: its 33 8-token sequences are 10 distinct ones, the rest repeats
    assert repeated_fraction(torch.arange(10).repeat(4).view(1, 40), n=8) == pytest.approx(1 - 10 / 33)


def test_builtin_corpus_is_a_healthy_calibration(smollm2_tokenizer):
    windows = token_windows(smollm2_tokenizer, corpus.calibration_samples(), 512, 64, "--calib")  # the defaults
    assert calibration_text_warning(windows, "C8 k/v at 30 attention sites") is None


def test_repetitive_or_small_calibration_text_is_named_with_the_fix(smollm2_tokenizer):
    repeated = token_windows(smollm2_tokenizer, [SENTENCE] * 100, 64, None, "--calib")  # 1792 tokens, 18 distinct
    message = calibration_text_warning(repeated, "C8 k/v at 2 attention sites")
    assert "repeat an earlier one" in message and "C8 k/v at 2 attention sites" in message
    assert (
        "calibrate on at least 2048 tokens of varied text like the deployment text" in message and "\n" not in message
    )
    small = token_windows(smollm2_tokenizer, corpus.calibration_samples(), 64, 4, "--calib")  # varied, 256 tokens
    message = calibration_text_warning(small, "FAQuant q/k/v at 2 attention sites")
    assert "only 256 tokens" in message and "repeat" not in message
