"""ONNX models one layer at a time (``--layerwise``, issue 13): the graph cut into one stage per attention site,
each stage's ONNX Runtime session made, run and dropped before the next. The same recipe, perplexities, saturation
and output bytes as the whole-model run, on torch.onnx exports (opset 20 and 23) and onnxruntime-genai's builder
model (GroupQueryAttention, external data); one stage's weights held at a time; the note when the model would not
fit."""

import hashlib
import json
import re
import weakref
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from qpass.cli import main
from qpass.core import memory
from qpass.core.data import read_samples, token_windows
from qpass.frontends.onnx.frontend import OnnxFrontend
from qpass.ort import stages as onnx_stages

SMALL = ["--window", "64", "--calib-samples", "4", "--eval-windows", "4", "--batch-size", "2"]
FORMS = {
    "opset20": (lambda dirs, genai: dirs[20], ["--kv-int8", "--fa-quant"]),
    "opset23": (lambda dirs, genai: dirs[23], ["--kv-int8", "--fa-quant"]),
    "genai": (lambda dirs, genai: genai, ["--kv-int8"]),
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("form", sorted(FORMS))
def test_layer_at_a_time_writes_what_the_whole_model_run_writes(onnx_dirs, genai_float_dir, text_files, tmp_path, form):
    """Calibration, evaluation and saturation stage by stage give the whole-model run's recipe and model bytes, and
    its perplexities and saturation counts; the report says the run was layer-wise."""
    source, flags = FORMS[form][0](onnx_dirs, genai_float_dir), FORMS[form][1]
    reports = {}
    for name, extra in (("whole", []), ("layerwise", ["--layerwise"])):
        out = tmp_path / name
        assert (
            main(
                [
                    "compile",
                    str(source),
                    *flags,
                    *extra,
                    "--calib",
                    str(text_files["calib"]),
                    "--eval",
                    str(text_files["prose"]),
                    "-o",
                    str(out),
                    *SMALL,
                ]
            )
            == 0
        )
        reports[name] = json.loads((out / "report.json").read_text())
    for name in ("model.onnx", "recipe/recipe.safetensors"):
        assert _sha(tmp_path / "whole" / name) == _sha(tmp_path / "layerwise" / name), name
    whole, layerwise = reports["whole"], reports["layerwise"]
    assert layerwise["calibration"]["layerwise"] is True and "layerwise" not in whole["calibration"]
    assert layerwise["model"]["layerwise"] is True and "layerwise" not in whole["model"]
    assert layerwise["eval"]["ppl_reference"] is None
    for key in ("ppl_float", "ppl_quant"):
        assert layerwise["eval"][key] == pytest.approx(whole["eval"][key], rel=1e-9), key
    assert layerwise["saturation"] == whole["saturation"]


def test_saturation_on_held_out_windows_and_the_note_when_the_model_would_not_fit(
    genai_float_dir, text_files, tmp_path, monkeypatch, capsys
):
    """Without ``--layerwise``, a model whose external weights would not fit runs one layer at a time, with a one-line
    note; without ``--eval`` its saturation is measured on held-out calibration windows, as the whole-model run's is."""
    args = ["--kv-int8", "--calib", str(text_files["calib"]), *SMALL[:-4], "--calib-samples", "8"]
    assert main(["compile", str(genai_float_dir), *args, "-o", str(tmp_path / "whole")]) == 0
    monkeypatch.setattr(memory, "available_memory", lambda: 1 << 20)
    capsys.readouterr()
    assert main(["compile", str(genai_float_dir), *args, "-o", str(tmp_path / "auto")]) == 0
    err = capsys.readouterr().err
    assert re.search(
        r"a whole-model compile needs about [\d.]+ GiB .* running it in ONNX Runtime one decoder layer at a time", err
    )
    whole, auto = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("whole", "auto"))
    assert auto["calibration"]["layerwise"] is True and auto["saturation"]["measured_on"] == "held_out"
    assert auto["saturation"] == whole["saturation"]
    assert _sha(tmp_path / "whole" / "model.onnx") == _sha(tmp_path / "auto" / "model.onnx")


@pytest.mark.parametrize("form", ["opset20", "genai"])
def test_one_stage_of_weights_is_held_at_a_time(onnx_dirs, genai_float_dir, text_files, monkeypatch, form):
    """Each session is gone before the next is made, and holds the weights of at most two neighbouring decoder layers
    (a layer's attention, and the MLP of the layer before, which feeds it; the builder names the final norm
    ``layers.<count>.final_norm``); the stages together hold every weight."""
    source = FORMS[form][0](onnx_dirs, genai_float_dir)
    made, held = [], []
    real = onnx_stages.stage_session

    def recording(model, base_dir):
        assert all(ref() is None for ref in made), "a stage's session outlived its turn"
        session = real(model, base_dir)
        made.append(weakref.ref(session._sess))  # ONNX Runtime's own session, which holds the weights
        held.append({tensor.name for tensor in model.graph.initializer})
        return session

    monkeypatch.setattr(onnx_stages, "stage_session", recording)
    frontend = OnnxFrontend.load(source, 64, layerwise=True)
    windows = token_windows(frontend.tokenizer, read_samples(text_files["calib"], "--calib"), 64, 4, "--calib")
    frontend.window_nll(None, windows, 2)
    assert len(held) == 2
    for index, names in enumerate(held):
        layers = {
            int(m.group(1)) for name in names if (m := re.search(r"layers\.(\d+)\.", name)) and "final_norm" not in name
        }
        assert layers <= {index - 1, index}, (index, layers)
    everything = {
        v.name
        for v in frontend.model.graph.initializers.values()
        if v.const_value is not None and v.const_value.size > 64
    }
    assert everything <= set().union(*held)


def test_the_written_model_is_read_back_one_stage_at_a_time(onnx_dirs, text_files, tmp_path, monkeypatch):
    """Every ONNX Runtime session of a layer-wise compile, the writer's read-back included, holds one stage: fewer
    nodes than the model has."""
    import onnxruntime as ort

    loaded = []
    real = ort.InferenceSession

    class Recording(real):
        def __init__(self, model, *args, **kwargs):
            loaded.append(
                len(
                    (
                        onnx.load(model, load_external_data=False)
                        if isinstance(model, str)
                        else onnx.load_from_string(model)
                    ).graph.node
                )
            )
            super().__init__(model, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", Recording)
    out = tmp_path / "out"
    assert (
        main(
            [
                "compile",
                str(onnx_dirs[23]),
                "--fa-quant",
                "--layerwise",
                "--calib",
                str(text_files["calib"]),
                "-o",
                str(out),
                *SMALL,
            ]
        )
        == 0
    )
    assert len(loaded) == 2 * 3  # two stages each for calibration, held-out saturation and the read-back
    assert max(loaded) < len(onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node)


def test_values_crossing_a_boundary_are_dropped_after_their_last_reader(onnx_dirs, text_files, monkeypatch):
    """Each value kept for a later stage is dropped once the last stage reading it has run, never before."""
    from qpass.core.spill import Spill

    events = []
    real_put, real_drop = Spill.put, Spill.drop
    monkeypatch.setattr(
        Spill,
        "put",
        lambda self, name, batch, value: (events.append(("add", name)), real_put(self, name, batch, value)),
    )
    monkeypatch.setattr(Spill, "drop", lambda self, name: (events.append(("drop", name)), real_drop(self, name)))
    frontend = OnnxFrontend.load(onnx_dirs[20], 64, layerwise=True)
    windows = token_windows(frontend.tokenizer, read_samples(text_files["calib"], "--calib"), 64, 4, "--calib")
    model = frontend._layerwise(frontend.model)
    frontend.window_nll(None, windows, 2)
    added = {name for kind, name in events if kind == "add"}
    dropped = [name for kind, name in events if kind == "drop"]
    assert added and sorted(dropped) == sorted(added)  # each once
    for name in added:  # dropped after the last add of every value its last reader reads
        last_reader = model.stages[model.last_read[name]]
        last_input = max(i for i, (kind, n) in enumerate(events) if kind == "add" and n in last_reader.inputs)
        assert events.index(("drop", name)) > last_input, name


def test_a_value_an_if_branch_reads_from_outside_crosses_into_its_stage():
    """Nodes go to the first stage whose attention needs them; the outer values a subgraph reads count as read."""
    then = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1])],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["a"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Sigmoid", ["a"], ["att0"]),
            helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])),
            helper.make_node("If", ["c"], ["branch"], then_branch=then, else_branch=other),
            helper.make_node("Add", ["branch", "att0"], ["att1"]),
            helper.make_node("Mul", ["att1", "w"], ["logits"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1])],
        [helper.make_tensor("w", TensorProto.FLOAT, [1], [2.0])],
    )
    onnx.checker.check_model(helper.make_model(graph))
    first, second = onnx_stages.split(graph, ["att0", "att1"])
    assert first.nodes == (0, 1) and set(first.outputs) == {"a", "att0"}
    assert second.nodes == (2, 3, 4, 5) and set(second.inputs) == {"a", "att0"}  # the Constant goes with its reader
    assert second.initializers == ("w",) and "logits" in second.outputs


def test_qpass_eval_runs_an_output_too_large_for_memory_by_stage(
    genai_float_dir, text_files, tmp_path, monkeypatch, capsys
):
    """``qpass eval`` of an ONNX output that would not fit in memory runs it one stage at a time: the same perplexity
    and saturation as the whole-model run."""
    out = tmp_path / "out"
    assert (
        main(
            ["compile", str(genai_float_dir), "--kv-int8", "--calib", str(text_files["calib"]), "-o", str(out), *SMALL]
        )
        == 0
    )
    results = []
    for available in (None, 1 << 20):
        if available:
            monkeypatch.setattr(memory, "available_memory", lambda: available)
        capsys.readouterr()
        assert main(["eval", str(out), "--eval", str(text_files["prose"]), "--eval-windows", "4", "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    whole, layerwise = results
    assert "layerwise" not in whole and layerwise["layerwise"] is True
    assert layerwise["ppl_quant"] == pytest.approx(whole["ppl_quant"], rel=1e-9)
    assert layerwise["saturation"] == whole["saturation"]


def test_the_memory_a_whole_run_needs_is_read_from_the_graph_without_the_weights(genai_float_dir, onnx_dirs):
    """External weights count by the lengths the graph gives (the data file is not read); a model with every weight
    inside its protobuf (under 2 GiB) is not counted: it runs whole."""
    from qpass.frontends.onnx.load import ORT_FACTOR, whole_model_memory

    external = (genai_float_dir / "model.onnx.data").stat().st_size
    assert whole_model_memory(genai_float_dir) == pytest.approx(external * ORT_FACTOR, rel=0.01)
    assert whole_model_memory(onnx_dirs[20] / "model.onnx") is None
    assert whole_model_memory(onnx_dirs[20] / "missing.onnx") is None


def test_boundary_values_past_the_budget_go_to_temporary_files_and_give_the_same_numbers(
    onnx_dirs, text_files, monkeypatch
):
    """With no memory to spare, every value crossing a stage boundary is kept in a temporary file, removed when its
    last reader is done; the perplexity is the in-memory run's, and no file is left behind."""
    import tempfile

    from qpass.frontends.onnx.layerwise import LayerwiseModel

    frontend = OnnxFrontend.load(onnx_dirs[20], 64, layerwise=True)
    windows = token_windows(frontend.tokenizer, read_samples(text_files["calib"], "--calib"), 64, 4, "--calib")
    in_memory = frontend.window_nll(None, windows, 2)
    before = set(Path(tempfile.gettempdir()).glob("qpass-stages-*"))
    monkeypatch.setattr(memory, "available_memory", lambda: 0)
    model = LayerwiseModel(
        frontend.model, frontend.site_docs, [s.attention for s in frontend.attention_sites()], frontend.path.parent
    )
    spilled = model.window_nll(windows, 2, "eval")
    assert model.spilled and set(Path(tempfile.gettempdir()).glob("qpass-stages-*")) == before
    assert spilled.tolist() == in_memory.tolist()
