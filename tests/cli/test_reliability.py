"""Reliability: interrupted runs leave nothing, same inputs give the same bytes, every writer reads its output
back before moving it into place, and the readers of untrusted text give a result or a QpassError for any input
(hypothesis)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qpass.cli import main
from qpass.core.data import read_samples, read_text
from qpass.core.errors import QpassError
from qpass.core.recipe import JSON_FILE, TENSORS_FILE, Recipe

SMALL = ["--window", "64", "--calib-samples", "4", "--batch-size", "2"]


@pytest.mark.parametrize(
    "sig, when", [(signal.SIGINT, "writing"), (signal.SIGTERM, "writing"), (signal.SIGTERM, "calibrating")]
)
def test_an_interrupted_compile_leaves_nothing(tiny_model_dir, text_files, tmp_path, sig, when):
    out = tmp_path / "out"
    calib = ["--calib-samples", "64"] if when == "calibrating" else []
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qpass.cli",
            "compile",
            str(tiny_model_dir),
            "--fa-quant",
            "--kv-int8",
            "--calib",
            str(text_files["calib"]),
            "-o",
            str(out),
            *SMALL,
            *calib,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        staged = list(tmp_path.glob(".out.qpass-*"))
        if (when == "writing" and staged) or (when == "calibrating" and time.monotonic() > deadline - 300 + 8):
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=300)
    if proc.returncode == 0:
        pytest.skip("the compile finished before the signal could land")  # a fast machine: nothing to interrupt
    assert proc.returncode == 130 and "interrupted; nothing was written" in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporary directory


@pytest.mark.parametrize(
    "form", [["--format", "mindie"], ["--format", "vllm-ascend", "--symmetric"]], ids=["mindie", "vllm-ascend"]
)
def test_two_weight_directory_compiles_write_the_same_bytes(tiny_model_dir, text_files, tmp_path, form):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert (
            main(
                [
                    "compile",
                    str(tiny_model_dir),
                    "--w8a8",
                    "--kv-int8",
                    "--anti-method",
                    "m1",
                    "--calib",
                    str(text_files["calib"]),
                    *form,
                    "-o",
                    str(out),
                    *SMALL,
                ]
            )
            == 0
        )
    for name in ("quant_model_weight_w8a8.safetensors", "quant_model_description.json", "config.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


EXAMPLES = int(os.environ.get("QPASS_FUZZ_EXAMPLES", "60"))  # more for a longer hunt: QPASS_FUZZ_EXAMPLES=1000
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same cases in every run (CI)
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(data=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_the_calibration_reader_takes_any_bytes(tmp_path, data):
    for name in ("calib.jsonl", "calib.txt"):
        path = tmp_path / name
        path.write_bytes(data)
        try:
            samples = read_samples(path)
        except QpassError:
            continue
        assert samples and all(isinstance(s, str) and s.strip() for s in samples)
    try:
        read_text(path)
    except QpassError:
        pass


@FUZZ
@given(lines=st.lists(JSON_VALUES.map(json.dumps) | st.text(max_size=30), min_size=1, max_size=5))
def test_the_calibration_reader_takes_any_jsonl(tmp_path, lines):
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    try:
        read_samples(path)
    except QpassError:
        pass


def _copy_with(src, d, name: str, doc, key):
    """A fresh copy of directory ``src`` at ``d`` whose JSON file ``name`` is ``doc``, or has ``doc`` under ``key``."""
    import shutil

    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(src, d)
    original = json.loads((d / name).read_text())
    (d / name).write_text(json.dumps(doc if key is None else {**original, key: doc}))
    return d


@pytest.fixture(scope="module")
def saved_recipe(tmp_path_factory):
    import torch

    from qpass.core.config import QuantConfig
    from qpass.core.recipe import SiteGeometry

    d = tmp_path_factory.mktemp("recipe")
    Recipe(
        QuantConfig(kv_cache="static"),
        [SiteGeometry(0, 4, 2, 16)],
        {
            "layers.0.kv_k.scale": torch.full((32,), 0.02),
            "layers.0.kv_k.offset": torch.zeros(32),
            "layers.0.kv_v.scale": torch.full((32,), 0.03),
            "layers.0.kv_v.offset": torch.zeros(32),
        },
    ).save(d)
    return d


@FUZZ
@given(doc=JSON_VALUES, key=st.sampled_from(["config", "sites", "version", "stats", "w8a8", "axes", None]))
def test_the_recipe_reader_takes_any_json(saved_recipe, tmp_path, doc, key):
    d = _copy_with(saved_recipe, tmp_path / "r", JSON_FILE, doc, key)
    try:
        Recipe.load(d)
    except QpassError:
        pass


@pytest.fixture(scope="module")
def mindie_dir(tmp_path_factory):
    """A small W8A8 + C8 MindIE directory to corrupt."""
    import torch

    from qpass.exporters.mindie_write import export_mindie
    from qpass.models.tiny import tiny_model
    from tests.helpers.frontend_cases import calibrated

    model = tiny_model("llama", num_layers=1)
    _, recipe = calibrated(model, torch.randint(0, 256, (2, 16)), kv_cache="static", w8a8=True)
    d = tmp_path_factory.mktemp("mindie") / "m"
    export_mindie(model.config.to_dict(), model.state_dict(), recipe, None, d, torch.float16)
    return d


@FUZZ
@given(
    doc=JSON_VALUES,
    which=st.sampled_from(["quant_model_description.json", "config.json"]),
    key=st.sampled_from(
        [
            "model_quant_type",
            "kv_cache_type",
            "model_type",
            "num_hidden_layers",
            "quantization_config",
            "torch_dtype",
            "model.norm.weight",
            "model.layers.0.self_attn.q_proj.weight",
            None,
        ]
    ),
)
def test_the_mindie_reader_takes_any_description_and_config(mindie_dir, tmp_path, doc, which, key):
    from qpass.exporters.mindie_load import load

    d = _copy_with(mindie_dir, tmp_path / "m", which, doc, key)
    try:
        load(d, load_tokenizer=False)
    except QpassError:
        pass


def test_a_value_that_is_zero_throughout_calibration_is_refused_with_its_site():
    import torch

    from qpass.core.calibrate import attention_qparams
    from qpass.core.config import QuantConfig
    from qpass.core.observers import Observer
    from qpass.core.sites import AttentionSite

    site = AttentionSite(
        3, "sdpa_3", "sdpa", "q3", "k3", "v3", 2, 1, 4, True, False, "?", "?", "?", "model.layers.3.self_attn"
    )
    observers = {name: Observer() for name in ("k3", "v3")}
    observers["k3"].update(torch.randn(8, 4))
    observers["v3"].update(torch.cat([torch.randn(8, 3), torch.zeros(8, 1)], 1))
    tensors, stats = attention_qparams([site], observers, QuantConfig(kv_cache="static"))
    assert stats["zero_range_channels"] == {"3": {"v": 1}}  # flagged in the report
    assert tensors["layers.3.kv_v.scale"][3] == 1.0
    observers["k3"] = Observer()
    observers["k3"].update(torch.zeros(8, 4))
    with pytest.raises(
        QpassError, match="k of attention layer 3 \\(model.layers.3.self_attn\\) was 0 in every channel"
    ):
        attention_qparams([site], observers, QuantConfig(kv_cache="static"))


@pytest.fixture(scope="module")
def compile_result(tiny_model_dir, text_files):
    """One compile that every format can write: W8A8 and symmetric C8."""
    import qpass
    from qpass.core.config import QuantConfig

    config = QuantConfig(kv_cache="static", symmetric=True, w8a8=True)
    run = qpass.RunSettings(window=64, calib_samples=4, batch_size=2)
    return qpass.compile(str(tiny_model_dir), config, calib=text_files["calib"], run=run)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _nan_scale(d):
    from safetensors.torch import load_file, save_file

    t = load_file(d / "quant_model_weight_w8a8.safetensors")
    t["model.layers.1.self_attn.k_proj.kv_cache_scale"][3] = float("nan")
    save_file(t, d / "quant_model_weight_w8a8.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "format, module, spoil, message",
    [
        ("qpass", "qpass_format", lambda d: _truncate(d / "program.pt2"), "program.pt2: did not read back whole"),
        ("qpass", "qpass_format", lambda d: _truncate(d / "recipe" / TENSORS_FILE), "cannot read recipe.safetensors"),
        (
            "mindie",
            "mindie_write",
            _nan_scale,
            "kv_cache_scale (C8 k_proj kv_cache_scale) has a value that is not a positive",
        ),
        (
            "vllm-ascend",
            "mindie_write",
            lambda d: (d / "quant_model_description.json").write_text("{}"),
            "model_quant_type is None",
        ),
    ],
    ids=["qpass-program", "qpass-recipe", "mindie", "vllm-ascend"],
)
def test_every_writer_reads_its_output_back_before_moving_it_into_place(
    compile_result, tmp_path, monkeypatch, format, module, spoil, message
):
    """A directory that does not read back whole (here spoilt between the write and the check) is refused, and
    nothing reaches the output path."""
    import importlib

    exporter = importlib.import_module(f"qpass.exporters.{module}")
    name = "write_vllm_ascend" if format == "vllm-ascend" else "write"
    original = getattr(exporter, name)

    def write_then_spoil(compiled, directory, options):
        original(compiled, directory, options)
        spoil(directory)

    monkeypatch.setattr(exporter, name, write_then_spoil)
    with pytest.raises(QpassError, match=re.escape(message)):
        compile_result.save(tmp_path / "out", format=format)
    assert list(tmp_path.iterdir()) == []  # no output, no staged directory


def test_two_lowerings_save_the_same_decoder_bytes(tmp_path):
    """The lowered decoder is exported a second time; that export's provenance metadata named earlier graphs by
    their id(), so decoder.pt2 differed from run to run (measured on SmolLM2) until the pipeline dropped it."""
    import torch

    from qpass.frontends.torch_export.decoder import build_decoder
    from tests.helpers.paged_cases import recipe_for, tiny

    saved = []
    for run in ("a", "b"):
        torch.manual_seed(0)
        model = tiny("llama")
        _, lowered = build_decoder(model, recipe_for(model, "kv-int8"), max_context=128)
        (tmp_path / run).mkdir()
        torch.export.save(lowered, str(tmp_path / run / "decoder.pt2"))
        saved.append((tmp_path / run / "decoder.pt2").read_bytes())
    assert saved[0] == saved[1]


def test_the_output_directory_has_the_usual_permissions(tmp_path):
    import os

    from qpass.core.output import atomic_output_dir

    with atomic_output_dir(tmp_path / "out", force=False) as tmp:
        (tmp / "f").write_text("x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


@pytest.mark.parametrize("where", ["model", "inside", "calib"])
def test_save_never_replaces_or_writes_into_an_input(compile_result, tiny_model_dir, text_files, where):
    """The API's ``save`` keeps apart from what the compile read, ``force`` or not (the CLI checks the same paths
    before any work): the model directory is neither replaced nor written into, nor a directory holding a text."""
    from qpass.core.errors import QpassError

    out = {"model": tiny_model_dir, "inside": tiny_model_dir / "out", "calib": Path(text_files["calib"]).parent}[where]
    before = sorted((p.name, p.stat().st_size) for p in tiny_model_dir.iterdir())
    with pytest.raises(QpassError, match="an input is never replaced or written into"):
        compile_result.save(out, force=True)
    assert sorted((p.name, p.stat().st_size) for p in tiny_model_dir.iterdir()) == before
