"""``qpass eval DIR --context N`` and ``qpass compile --long-context N`` on a tiny random Llama (head_dim 64, so the
decoder is lowered): the plumbing of the long-context check (the paged op is what runs the quantized model, the
buckets add up to the tokens, the retrieval grid is complete) and its one-line refusals."""

import json

import pytest
import torch

from qpass.cli import main
from qpass.core import longcontext
from qpass.frontends.torch_export import longcontext as te_longcontext
from qpass.runtime import paged_attention
from tests.helpers.paged_cases import tiny

SMALL = ["--window", "64", "--calib-samples", "4", "--eval-windows", "4", "--batch-size", "2"]
CONTEXT = 160


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm2_tokenizer):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama-64")
    tiny("llama", vocab_size=len(smollm2_tokenizer)).save_pretrained(path, safe_serialization=True)
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def compiled(model_dir, tmp_path_factory, text_files):
    out = tmp_path_factory.mktemp("long") / "out"
    args = ["compile", str(model_dir), "--kv-int8", "--calib", str(text_files["calib"]), "-o", str(out), *SMALL]
    assert main(args) == 0
    return out


@pytest.fixture
def spy(monkeypatch):
    """The query lengths of every call of the paged prefill op's CPU path (decode calls have one query token)."""
    calls = []
    real = paged_attention.paged_prefill_attention_int8_torch

    def counting(query, *args):
        calls.append(query.shape[0])
        return real(query, *args)

    monkeypatch.setattr(paged_attention, "paged_prefill_attention_int8_torch", counting)
    return calls


def test_eval_context_runs_the_quantized_model_through_the_paged_op(compiled, spy, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(te_longcontext, "PREFILL_CHUNK", 64)  # several prefill calls, as at long context
    plot = tmp_path / "lc.png"
    code = main(["eval", str(compiled), "--context", str(CONTEXT), "--documents", "2", "--json", "--plot", str(plot)])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert "paged int8" in result["path"] and plot.stat().st_size > 0
    assert result["calibrated_window"] == 64  # the compile's --window, for the late-position warning's hint
    # the paged path is what runs: per document and layer (2 layers), prefill in calls of at most 64 tokens, then
    # one call per decoded token; the passkey prompts likewise, prefilled then decoding the key
    decoded = longcontext.decode_tokens(CONTEXT)
    prefill = CONTEXT - decoded
    per_document = [min(64, prefill - a) for a in range(0, prefill, 64)] + [1] * (decoded - 1)
    assert spy[: 2 * 2 * len(per_document)] == [n for n in per_document for _ in range(2)] * 2
    assert max(spy) == 64 and spy.count(1) > 2 * 2 * (decoded - 1)
    # the buckets add up to every predicted token of every document
    rows = result["buckets"]
    assert sum(r["tokens"] for r in rows) == 2 * (CONTEXT - 1)
    assert [r["positions"] for r in rows] == [[1, 20], [20, 40], [40, 80], [80, 160]]
    assert all(r["interval"] > 0 for r in rows)
    # the grid is complete: every depth at every length, both models
    cells = result["retrieval"]["cells"]
    lengths = longcontext.passkey_lengths(CONTEXT)
    assert sorted((c["length"], c["depth"]) for c in cells) == sorted(
        (n, d) for n in lengths for d in longcontext.DEPTHS
    )
    assert all(isinstance(c["float"], bool) and isinstance(c["quant"], bool) for c in cells)
    # each key token above one half is the model's first choice: retrieved
    assert all(0 < c[f"{m}_p"] <= 1 and (c[f"{m}_p"] <= 0.5 or c[m]) for c in cells for m in ("float", "quant"))
    assert set(result["retrieval"]["lengths"]) == {str(n) for n in lengths}


def test_eval_context_is_deterministic_and_prints_a_table(compiled, capsys):
    args = ["eval", str(compiled), "--context", "128", "--documents", "1"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out.split("timings")[0] == first.split("timings")[0]
    assert "positions" in first and "passkey retrieved" in first and "paged int8" in first


def test_compile_long_context_puts_the_check_in_the_report(model_dir, text_files, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["compile", str(model_dir), "--kv-int8", "--calib", str(text_files["calib"]), "-o", str(out), *SMALL]
    assert main([*args, "--long-context", "128"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["long_context"]["context"] == 128 and "positions" in printed
    assert (out / "longcontext.png").is_file() and "long context" in (out / "report.txt").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--context", "0"], "--context 0: must be an integer of at least 128 tokens"),
        (["--context", "100000"], "--context 100000: beyond the 512 positions the model takes"),
        (["--context", "128", "--no-float"], "drop --no-float"),
        (["--documents", "2"], "--documents: it sets the long-context check; add --context N"),
        (["--context", "128", "--documents", "0"], "--documents 0: must be a positive integer"),
        (["--context", "512", "--documents", "1000"], "--documents 1000 of --context 512"),
    ],
)
def test_bad_long_context_options_are_refused_in_one_line(compiled, capsys, extra, message):
    assert main(["eval", str(compiled), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_compile_refuses_a_long_context_beyond_the_model_before_writing(model_dir, text_files, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["compile", str(model_dir), "--kv-int8", "--calib", str(text_files["calib"]), "-o", str(out), *SMALL]
    assert main([*args, "--long-context", "4096"]) == 2
    assert "--long-context 4096: beyond the 512 positions" in capsys.readouterr().err and not out.exists()


def test_a_mindie_directory_runs_through_a_decoder_lowered_from_its_parameters(model_dir, text_files, tmp_path, capsys):
    out = tmp_path / "mindie"
    args = ["compile", str(model_dir), "--w8a8", "--kv-int8", "--format", "mindie", "--calib", str(text_files["calib"])]
    assert main([*args, "-o", str(out), *SMALL]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--context", "128", "--documents", "1", "--float", str(model_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "lowered again from the recipe" in result["path"]
    assert sum(r["tokens"] for r in result["buckets"]) == 127


def test_directories_without_an_int8_cache_to_check_are_refused_in_one_line():
    from qpass.core.errors import QpassError
    from qpass.exporters.base import Loaded

    w8a8_only = Loaded("mindie", None, None, model=torch.nn.Linear(1, 1))
    with pytest.raises(QpassError, match="W8A8 alone keeps the KV cache in float") as err:
        te_longcontext.paged_decoder(w8a8_only, 128, None)
    assert "\n" not in str(err.value)


def test_an_onnx_directory_runs_through_onnx_runtimes_int8_cache(onnx_dirs, text_files, tmp_path, capsys, monkeypatch):
    import numpy as np

    from qpass.frontends.onnx import longcontext as onnx_longcontext
    from qpass.frontends.onnx.frontend import OnnxFrontend
    from qpass.frontends.onnx.session import Runner, session

    # chunks on the fed-back cache give the logits of one run over the whole sequence
    reference = OnnxFrontend.load(onnx_dirs[20], 128)
    runner = Runner(session(reference.path), reference.site_docs)
    ids = torch.randint(0, 1000, (100,)).tolist()
    monkeypatch.setattr(onnx_longcontext, "PREFILL_CHUNK", 32)
    nll, _ = onnx_longcontext.scores(runner, ids, 80, "test")
    whole = torch.from_numpy(np.asarray(runner.logits(torch.tensor([ids]))[0, :-1], dtype=np.float32))
    expected = torch.nn.functional.cross_entropy(whole, torch.tensor(ids[1:]), reduction="none").double()
    assert (nll - expected).abs().max() < 1e-4
    out = tmp_path / "onnx"
    args = ["compile", str(onnx_dirs[20]), "--kv-int8", "--calib", str(text_files["calib"]), "-o", str(out), *SMALL]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--context", "128", "--documents", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["path"].startswith("ONNX Runtime") and "int8" in result["path"]
    assert sum(r["tokens"] for r in result["buckets"]) == 127 and len(result["retrieval"]["cells"]) == 3


def test_compile_refuses_a_long_context_check_of_a_model_the_paged_ops_cannot_run(
    tiny_model_dir, text_files, tmp_path, capsys
):
    out = tmp_path / "out"  # head_dim 16: the paged ops take 64, 128, 256, so no decoder is lowered
    args = ["compile", str(tiny_model_dir), "--kv-int8", "--calib", str(text_files["calib"]), "-o", str(out), *SMALL]
    assert main([*args, "--long-context", "128"]) == 2
    err = capsys.readouterr().err
    assert "--long-context: this compile lowers no paged decoder to check (head_dim=16" in err and not out.exists()
