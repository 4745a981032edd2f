"""ONNX decoders as people export them (issue 24): a batch the export fixes (1, or 2 with an odd number of windows),
int32 ``input_ids``, the logits under another name compile to the dynamic export's recipe and perplexity, whole and
layer by layer, and ``qpass eval`` / ``qpass run`` read their outputs back; logits that are not one output, external
data outside the model's directory, and an output directory whose ``model.onnx.data`` is gone or cut are refused in
one line, exit 2, before any forward pass (tests/helpers/refusals.py's watch), nothing written, the input
unchanged."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from safetensors.numpy import load_file

from qpass.cli import main
from tests.helpers import onnx_forms
from tests.helpers.refusals import watch_forward_passes

# 3 windows in batches of 2: a fixed batch of 2 runs the last one filled up with a copy
SMALL = ["--window", "64", "--calib-samples", "3", "--eval-windows", "3", "--batch-size", "2"]
PROMPT = ["--prompt", "def main():", "--max-new-tokens", "6"]


def _digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _compile(source: Path, out: Path, text_files, *extra: str) -> int:
    args = ["compile", str(source), "--kv-int8", "--fa-quant", "--calib", str(text_files["calib"])]
    return main([*args, "--eval", str(text_files["prose"]), "-o", str(out), *SMALL, *extra])


def _refused(args: list[str], capsys, monkeypatch, *said: str) -> str:
    """``args`` refused in one line saying each of ``said``, exit 2, before any forward pass."""
    capsys.readouterr()
    started = watch_forward_passes(monkeypatch)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and all(s in err for s in said), err
    assert not started, f"refused after the model ran ({started[0]})"
    return err


@pytest.fixture(scope="module")
def forms(tiny_model_dir, onnx_dirs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("forms")
    dynamic = onnx_dirs[20]
    return {
        "fixed batch 1": onnx_forms.export_fixed_batch(tiny_model_dir, root / "fixed1", batch=1),
        "fixed batch 2": onnx_forms.export_fixed_batch(tiny_model_dir, root / "fixed2", batch=2),
        "int32 input_ids": onnx_forms.with_int32_ids(dynamic, root / "int32"),
        "logits as output_0": onnx_forms.with_logits_named(dynamic, root / "output_0", "output_0"),
        "logits as lm_logits": onnx_forms.with_logits_named(dynamic, root / "lm_logits", "lm_logits"),
    }


@pytest.fixture(scope="module")
def baseline(onnx_dirs, text_files, tmp_path_factory) -> Path:
    """The dynamic-batch export, compiled."""
    out = tmp_path_factory.mktemp("baseline") / "out"
    assert _compile(onnx_dirs[20], out, text_files) == 0
    return out


def _same_numbers(out: Path, baseline: Path) -> None:
    ours, theirs = (
        load_file(out / "recipe" / "recipe.safetensors"),
        load_file(baseline / "recipe" / "recipe.safetensors"),
    )
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        np.testing.assert_allclose(ours[name], tensor, rtol=1e-6, atol=0, err_msg=name)
    ours, theirs = (json.loads((d / "report.json").read_text())["eval"] for d in (out, baseline))
    for key in ("ppl_float", "ppl_quant"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-6), key


@pytest.mark.parametrize(
    "form", ["fixed batch 1", "fixed batch 2", "int32 input_ids", "logits as output_0", "logits as lm_logits"]
)
def test_a_form_compiles_to_the_dynamic_exports_numbers_and_reads_back(
    form, forms, baseline, text_files, tmp_path, capsys
):
    before = _digest(forms[form])
    out = tmp_path / "out"
    assert _compile(forms[form], out, text_files) == 0
    assert _digest(forms[form]) == before
    _same_numbers(out, baseline)
    read_back = []
    for directory in (out, baseline):
        capsys.readouterr()
        assert main(["eval", str(directory), "--eval", str(text_files["prose"]), "--eval-windows", "3", "--json"]) == 0
        ppl = json.loads(capsys.readouterr().out)["ppl_quant"]
        assert main(["run", str(directory), *PROMPT]) == 0
        read_back.append((ppl, capsys.readouterr().out))
    assert read_back[0][0] == pytest.approx(read_back[1][0], rel=1e-6)
    assert read_back[0][1] == read_back[1][1]  # greedy decoding: the same tokens


def test_a_fixed_batch_runs_layer_by_layer_to_the_same_numbers(forms, baseline, text_files, tmp_path):
    out = tmp_path / "out"
    assert _compile(forms["fixed batch 2"], out, text_files, "--layerwise") == 0
    assert json.loads((out / "report.json").read_text())["calibration"]["layerwise"] is True
    _same_numbers(out, baseline)


def test_logits_that_are_not_one_output_are_refused_in_one_line(onnx_dirs, text_files, tmp_path, capsys, monkeypatch):
    source = onnx_forms.with_outputs_added(onnx_dirs[20], tmp_path / "two", "output_0")
    before = _digest(source)
    out = tmp_path / "out"
    _refused(
        ["compile", str(source), "--kv-int8", "--calib", str(text_files["calib"]), "-o", str(out), *SMALL],
        capsys,
        monkeypatch,
        "output_0 and doubled could each be its logits",
        "name the logits output logits",
    )
    assert not out.exists() and _digest(source) == before


@pytest.mark.parametrize("where", ["../w.bin", "absolute", "a link out"])
def test_external_data_outside_the_models_directory_is_refused_before_any_work(
    where, onnx_dirs, text_files, tmp_path, capsys, monkeypatch
):
    if where == "absolute":
        source = onnx_forms.with_data_outside(onnx_dirs[20], tmp_path / "m", str(tmp_path / "w.bin"))
    elif where == "../w.bin":
        source = onnx_forms.with_data_outside(onnx_dirs[20], tmp_path / "m")
    else:  # model.onnx.data beside the model, a symbolic link to a file outside its directory
        source = tmp_path / "m"
        shutil.copytree(onnx_dirs[20], source)
        ir.save(ir.load(source / "model.onnx"), source / "model.onnx", external_data="model.onnx.data")
        shutil.move(source / "model.onnx.data", tmp_path / "w.bin")
        os.symlink(tmp_path / "w.bin", source / "model.onnx.data")
    before = _digest(tmp_path)
    out = tmp_path / "out"
    _refused(
        ["compile", str(source), "--kv-int8", "--calib", str(text_files["calib"]), "-o", str(out), *SMALL],
        capsys,
        monkeypatch,
        "the external data of",
        "outside the model's directory",
        "beside model.onnx",
    )
    assert not out.exists() and _digest(tmp_path) == before


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_eval_and_run_refuse_an_output_whose_external_data_is_gone(
    damage, baseline, text_files, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    shutil.copytree(baseline, out)
    ir.save(ir.load(baseline / "model.onnx"), out / "model.onnx", external_data="model.onnx.data")
    data = out / "model.onnx.data"
    if damage == "deleted":
        data.unlink()
    else:
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    before = _digest(out)
    for args in (
        ["eval", str(out), "--eval", str(text_files["prose"]), "--eval-windows", "3"],
        ["run", str(out), *PROMPT],
    ):
        _refused(args, capsys, monkeypatch, "model.onnx: the external data of", "is missing or short", "recompile")
    assert _digest(out) == before
