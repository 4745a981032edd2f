"""What the ONNX loader refuses before any work (issue 24): an empty file, a genai_config.json with nulls where
counts belong, a window past the model's context length. One line, exit 2, nothing written, the input unchanged."""

import json
import shutil

import pytest

from qpass.cli import main

SMALL = ["--window", "64", "--calib-samples", "4", "--batch-size", "2"]


def _refused(args, capsys, words, fix):
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert words in err and fix in err, err


def _genai_copy(genai_float_dir, tmp_path, edit):
    d = tmp_path / "genai"
    shutil.copytree(genai_float_dir, d)
    doc = json.loads((d / "genai_config.json").read_text())
    edit(doc)
    (d / "genai_config.json").write_text(json.dumps(doc))
    return d


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda d: d["model"].update(context_length=None), "model.context_length is null, not a positive integer"),
        (lambda d: d["model"]["decoder"].update(num_key_value_heads=None), "model.decoder.num_key_value_heads is null"),
        (lambda d: d.update(search=None), "has no 'model' and 'search' objects"),
    ],
)
def test_a_genai_config_with_nulls_is_refused_before_calibration(
    genai_float_dir, text_files, tmp_path, capsys, edit, words
):
    d = _genai_copy(genai_float_dir, tmp_path, edit)
    before = (d / "genai_config.json").read_bytes()
    args = ["compile", str(d), "--kv-int8", *SMALL, "--calib", str(text_files["calib"]), "-o", str(tmp_path / "o")]
    _refused(args, capsys, words, "restore the file onnxruntime-genai's builder wrote")
    assert not (tmp_path / "o").exists() and (d / "genai_config.json").read_bytes() == before


def test_a_window_past_the_context_length_is_refused_up_front(genai_float_dir, text_files, tmp_path, capsys):
    d = _genai_copy(genai_float_dir, tmp_path, lambda doc: doc["model"].update(context_length=32))
    args = ["compile", str(d), "--kv-int8", *SMALL, "--calib", str(text_files["calib"]), "-o", str(tmp_path / "o")]
    _refused(args, capsys, "--window 64: longer than the 32 positions", "use --window 32 or less")
    assert not (tmp_path / "o").exists()


def test_an_empty_onnx_file_is_named_empty_not_opset_0(text_files, tmp_path, capsys):
    (tmp_path / "model.onnx").write_bytes(b"")
    args = [
        "compile",
        str(tmp_path / "model.onnx"),
        "--kv-int8",
        "--calib",
        str(text_files["calib"]),
        "-o",
        str(tmp_path / "o"),
    ]
    _refused(args, capsys, "holds no ONNX graph (0 bytes)", "export it again")
    assert not (tmp_path / "o").exists()


def test_a_fixed_sequence_axis_other_than_the_window_is_refused_up_front(onnx_dirs, text_files, tmp_path, capsys):
    """An export whose input_ids take a fixed number of tokens runs only windows of that length: another --window
    is refused before any run (ONNX Runtime would refuse every window mid-run)."""
    import onnx_ir as ir

    model = ir.load(onnx_dirs[20] / "model.onnx")
    ids = next(v for v in model.graph.inputs if v.name == "input_ids")
    ids.shape = ir.Shape([ids.shape[0], 16])
    d = tmp_path / "fixed"
    d.mkdir()
    ir.save(model, d / "model.onnx")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(onnx_dirs[20] / name, d / name)
    args = ["compile", str(d), "--kv-int8", *SMALL, "--calib", str(text_files["calib"]), "-o", str(tmp_path / "o")]
    _refused(args, capsys, "takes exactly 16 tokens a run", "use --window 16, or export the model with a dynamic")
    assert not (tmp_path / "o").exists()
