"""The ONNX inputs' bad-input corpus (issue 24): an ONNX file, its external data, onnxruntime-genai's directory, the
tokenizer beside it or given by --tokenizer, the options an ONNX model cannot take, and the ONNX output read back by
`qpass eval` / `qpass run`. Each case, as in tests/cli/test_bad_inputs.py: exit 2, one line naming the problem and
the way out, no traceback, nothing written (no output, no temporary directory), every input's bytes unchanged, and
refused before any forward pass (tests/helpers/refusals.py's watch).

Cells that do not apply to ONNX inputs: a config.json disagreeing with the weights (an ONNX graph carries its own
shapes; config.json beside it is copied, never read for geometry), pickle-only weights and remote code (neither is
ever read), and --layerwise (a mode, not an input: every refusal here comes at load, before either mode runs).
"""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir
import pytest

from qpass.cli import main
from tests.helpers.refusals import hashes, watch_forward_passes

SMALL = ["--window", "64", "--calib-samples", "4", "--batch-size", "2"]
BINARY = bytes(range(256)) * 8
# a tokenizer.json in a form the installed tokenizers does not know (as a newer release may write)
NEWER_TOKENIZER = json.dumps({"version": "9.0", "model": {"type": "FromTheFuture", "vocab": {}}}).encode()
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def onnx_out(onnx_dirs, text_files, tmp_path_factory) -> Path:
    """The ONNX output (C8) of the tiny Llama's export, to break copies of."""
    out = tmp_path_factory.mktemp("onnx-out") / "out"
    args = ["compile", str(onnx_dirs[20]), "--kv-int8", *SMALL, "--calib", str(text_files["calib"]), "-o", str(out)]
    assert main(args) == 0
    return out


@dataclass
class Inputs:
    onnx: Path  # the tiny Llama exported by torch.onnx (opset 20, weights inside the protobuf)
    genai: Path  # onnxruntime-genai's builder output of it (GroupQueryAttention, genai_config.json)
    text: dict
    p: Path  # where a case makes its broken inputs
    out: Path
    compiled: Path  # the ONNX output of ``onnx``

    def compile(self, *extra, model=None) -> list[str]:
        model = self.onnx if model is None else model
        return [
            "compile",
            str(model),
            "--kv-int8",
            *SMALL,
            "--calib",
            str(self.text["calib"]),
            "-o",
            str(self.out),
            *extra,
        ]

    def eval(self, directory) -> list[str]:
        return ["eval", str(directory), "--eval", str(self.text["prose"]), "--eval-windows", "2", "--no-float"]

    def copy(self, src: Path, name: str = "m") -> Path:
        dst = self.p / name
        shutil.copytree(src, dst)
        return dst


def edited(c: Inputs, edit, external: bool = False) -> str:
    """A copy of the export, its graph changed by ``edit(model)`` (onnx-ir), saved with its weights in
    ``model.onnx.data`` when ``external``."""
    d = c.copy(c.onnx)
    model = ir.load(d / "model.onnx")
    edit(model)
    ir.save(model, d / "model.onnx", external_data="model.onnx.data" if external else None)
    return str(d)


def with_data(c: Inputs, damage) -> str:
    """A copy of the export with its weights as external data, then ``damage(model.onnx.data path)``."""
    d = edited(c, lambda model: None, external=True)
    damage(Path(d) / "model.onnx.data")
    return d


def halve(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def onnx_file(c: Inputs, data: bytes | None = None) -> str:
    """A copy of the export's model.onnx with ``data`` for its bytes (None: its first half)."""
    path = c.copy(c.onnx) / "model.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2] if data is None else data)
    return str(path)


def output_with(c: Inputs, damage) -> str:
    """A copy of the ONNX output, then ``damage(its directory)``."""
    d = c.copy(c.compiled, "out-copy")
    damage(d)
    return str(d)


def genai_with(c: Inputs, edit) -> str:
    """A copy of onnxruntime-genai's directory, its genai_config.json changed by ``edit(doc)`` (or replaced by
    ``edit``'s bytes)."""
    d = c.copy(c.genai, "genai")
    if isinstance(edit, bytes):
        (d / "genai_config.json").write_bytes(edit)
    else:
        doc = json.loads((d / "genai_config.json").read_text())
        edit(doc)
        (d / "genai_config.json").write_text(json.dumps(doc))
    return str(d)


def tokenizer_with(c: Inputs, raw: dict | None = None, drop=TOKENIZER_FILES) -> str:
    """A copy of the export whose tokenizer files ``drop`` are removed and ``raw`` {name: bytes} written."""
    d = c.copy(c.onnx)
    for name in drop if raw is None else ():
        (d / name).unlink(missing_ok=True)
    for name, data in (raw or {}).items():
        (d / name).write_bytes(data)
    return str(d)


def wider_tokenizer(c: Inputs) -> str:
    """The model's tokenizer with 8 tokens more than its logits have."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(c.onnx)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(8)])
    tokenizer.save_pretrained(c.p / "wide")
    return str(c.p / "wide")


def fixed_sequence(model: ir.Model, length: int = 16) -> None:
    ids = next(v for v in model.graph.inputs if v.name == "input_ids")
    ids.shape = ir.Shape([ids.shape[0], length])


def no_attention(c: Inputs) -> str:
    """A decoder with token ids in and logits out and no attention between: an embedding, then a MatMul to the
    vocabulary."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    vocab, dim = 49152, 8
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["embed", "input_ids"], ["hidden"]),
            helper.make_node("MatMul", ["hidden", "head"], ["logits"]),
        ],
        "no-attention",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])],
        [
            numpy_helper.from_array(rng.standard_normal((vocab, dim), dtype=np.float32), "embed"),
            numpy_helper.from_array(rng.standard_normal((dim, vocab), dtype=np.float32), "head"),
        ],
    )
    d = c.copy(c.onnx)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(d / "model.onnx"))
    return str(d)


CASES = {
    # --- the ONNX file ---------------------------------------------------------------------------------------
    "onnx file missing": (
        lambda c: c.compile(model=c.p / "model.onnx"),
        "no such ONNX file",
        "give a .onnx file or a directory holding model.onnx",
    ),
    "onnx file empty": (
        lambda c: c.compile(model=onnx_file(c, b"")),
        "holds no ONNX graph (0 bytes)",
        "export it again",
    ),
    "onnx file truncated": (
        lambda c: c.compile(model=onnx_file(c)),
        "not a readable ONNX model",
        "export it again",
    ),
    "onnx file of another format": (
        lambda c: c.compile(model=onnx_file(c, BINARY)),
        "not a readable ONNX model",
        "export it again",
    ),
    "onnx opset below 17": (
        lambda c: c.compile(model=edited(c, lambda m: m.opset_imports.update({"": 16}))),
        "opset 16; qpass reads opset 17 and above",
        "export with opset_version>=17",
    ),
    "onnx without input_ids": (
        lambda c: c.compile(model=edited(c, lambda m: setattr(m.graph.inputs[0], "name", "tokens"))),
        "no input_ids input (inputs: tokens,",
        "export the decoder with token ids as input_ids",
    ),
    "onnx without attention": (
        lambda c: c.compile(model=no_attention(c)),
        "found no attention",
        "give a decoder whose attention is one of these",
    ),
    "onnx sequence fixed at another length than the window": (
        lambda c: c.compile(model=edited(c, fixed_sequence)),
        "takes exactly 16 tokens a run",
        "use --window 16, or export the model with a dynamic sequence axis",
    ),
    # --- its external data -----------------------------------------------------------------------------------
    "external data missing": (
        lambda c: c.compile(model=with_data(c, Path.unlink)),
        "the external data of",
        "is missing or short; keep the data file next to the model",
    ),
    "external data truncated": (
        lambda c: c.compile(model=with_data(c, halve)),
        "the external data of",
        "is missing or short; keep the data file next to the model",
    ),
    "external data with a second hard link": (
        lambda c: c.compile(model=with_data(c, lambda data: os.link(data, c.p / "linked.data"))),
        "is a file with 2 hard links",
        "copy it beside model.onnx as a file of its own",
    ),
    "external data a dangling link": (
        lambda c: c.compile(
            model=with_data(c, lambda data: (data.unlink(), data.symlink_to(data.parent / "gone.data")))
        ),
        "is missing or short",
        "keep the data file next to the model",
    ),
    # --- onnxruntime-genai's directory -----------------------------------------------------------------------
    "genai config not JSON": (
        lambda c: c.compile(model=genai_with(c, b'{"model": ')),
        "genai_config.json: not JSON",
        "restore the file onnxruntime-genai's builder wrote",
    ),
    "genai config a list": (
        lambda c: c.compile(model=genai_with(c, b"[]")),
        "has no 'model' and 'search' objects",
        "restore the file onnxruntime-genai's builder wrote",
    ),
    "genai config context length null": (
        lambda c: c.compile(model=genai_with(c, lambda d: d["model"].update(context_length=None))),
        "model.context_length is null, not a positive integer",
        "restore the file onnxruntime-genai's builder wrote",
    ),
    "genai config heads null": (
        lambda c: c.compile(model=genai_with(c, lambda d: d["model"]["decoder"].update(num_key_value_heads=None))),
        "model.decoder.num_key_value_heads is null",
        "restore the file onnxruntime-genai's builder wrote",
    ),
    "genai config search null": (
        lambda c: c.compile(model=genai_with(c, lambda d: d.update(search=None))),
        "has no 'model' and 'search' objects",
        "restore the file onnxruntime-genai's builder wrote",
    ),
    "genai config count negative": (
        lambda c: c.compile(model=genai_with(c, lambda d: d["model"]["decoder"].update(num_hidden_layers=-2))),
        "model.decoder.num_hidden_layers is -2, not a positive integer",
        "restore the file onnxruntime-genai's builder wrote",
    ),
    "genai config count a boolean": (
        lambda c: c.compile(model=genai_with(c, lambda d: d["model"].update(vocab_size=True))),
        "model.vocab_size is true, not a positive integer",
        "restore the file onnxruntime-genai's builder wrote",
    ),
    "window past the genai context length": (
        lambda c: c.compile(model=genai_with(c, lambda d: d["model"].update(context_length=32))),
        "--window 64: longer than the 32 positions",
        "use --window 32 or less",
    ),
    # --- the tokenizer ---------------------------------------------------------------------------------------
    "tokenizer missing": (
        lambda c: c.compile(model=tokenizer_with(c)),
        "cannot load the tokenizer",
        "give --tokenizer DIR",
    ),
    "tokenizer from a release this one cannot parse": (
        lambda c: c.compile(model=tokenizer_with(c, raw={"tokenizer.json": NEWER_TOKENIZER})),
        "cannot load the tokenizer",
        "re-save them with the installed transformers / tokenizers",
    ),
    "tokenizer directory missing": (
        lambda c: c.compile("--tokenizer", str(c.p / "no-tokenizer")),
        "cannot load the tokenizer",
        "give --tokenizer DIR",
    ),
    "tokenizer larger than the logits": (
        lambda c: c.compile("--tokenizer", wider_tokenizer(c)),
        "the tokenizer has 49160 tokens but the model's logits have 49152",
        "give the tokenizer the model was trained with",
    ),
    # --- options an ONNX model cannot take -------------------------------------------------------------------
    "w8a8": (
        lambda c: c.compile("--w8a8"),
        "--w8a8: qpass quantizes the attention of ONNX models",
        "compile the PyTorch model",
    ),
    "dynamic cache": (
        lambda c: c.compile("--kv-int8", "dynamic"),
        "--kv-int8 dynamic: qpass writes no per-token int8 cache form in ONNX",
        "use --kv-int8 (static, per channel)",
    ),
    "format qpass": (
        lambda c: c.compile("--format", "qpass"),
        "an ONNX input is written as ONNX",
        "drop --format",
    ),
    "dtype": (lambda c: c.compile("--dtype", "float16"), "an ONNX model keeps its own dtype", "drop --dtype"),
    "fa-quant on GroupQueryAttention": (
        lambda c: c.compile("--fa-quant", model=c.genai),
        "this model's GroupQueryAttention applies RoPE inside the op",
        "use --kv-int8, or export the model with torch.onnx",
    ),
    "output inside the model's directory": (
        lambda c: c.compile("-o", str(c.onnx / "out")),
        "lies inside the input",
        "choose an output path outside every input",
    ),
    # --- the ONNX output read back ---------------------------------------------------------------------------
    "eval of a truncated output model": (
        lambda c: c.eval(output_with(c, lambda d: halve(d / "model.onnx"))),
        "not a readable ONNX model",
        "recompile into a fresh directory",
    ),
    "eval of an output without its tokenizer": (
        lambda c: c.eval(output_with(c, lambda d: [(d / name).unlink(missing_ok=True) for name in TOKENIZER_FILES])),
        "cannot load the tokenizer",
        "recompile into a fresh directory",
    ),
    "eval of an output without its recipe": (
        lambda c: c.eval(output_with(c, lambda d: shutil.rmtree(d / "recipe"))),
        "not a directory written by `qpass compile -o`",
        "give one of those",
    ),
    "run with an empty prompt": (
        lambda c: ["run", str(c.compiled), "--prompt", ""],
        "the prompt has no tokens",
        "give some text",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_onnx_input_is_one_line_exit_2_before_any_run_and_changes_nothing(
    case, onnx_dirs, genai_float_dir, text_files, onnx_out, tmp_path, capsys, monkeypatch
):
    make_args, problem, fix = CASES[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    c = Inputs(onnx_dirs[20], genai_float_dir, text_files, inputs, tmp_path / "out", onnx_out)
    args = make_args(c)
    roots = (onnx_dirs[20], genai_float_dir, Path(text_files["calib"]).parent, onnx_out, inputs)
    before = hashes(*roots)
    capsys.readouterr()
    started = watch_forward_passes(monkeypatch)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert problem in err and fix in err, err
    assert not started, f"refused after the model ran ({started[0]}): every fault here is knowable before"
    assert not c.out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]  # no temporary directory left behind
    assert hashes(*roots) == before


def test_a_fixed_sequence_axis_compiles_at_that_window_and_reads_back(onnx_dirs, text_files, tmp_path, capsys):
    """An export whose input_ids take a fixed number of tokens compiles with --window of that length (443511b refuses
    any other) and `qpass eval` reads it back over the same window; `qpass run`, which feeds one token a step after
    the prompt, is refused before any run."""
    d = tmp_path / "fixed"
    shutil.copytree(onnx_dirs[20], d)
    model = ir.load(d / "model.onnx")
    fixed_sequence(model, 16)
    ir.save(model, d / "model.onnx")
    out = tmp_path / "out"
    args = ["compile", str(d), "--kv-int8", "--window", "16", "--calib-samples", "8", "--batch-size", "2"]
    prose = str(text_files["prose"])
    assert (
        main([*args, "--calib", str(text_files["calib"]), "--eval", prose, "--eval-windows", "4", "-o", str(out)]) == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["window"] == 16 and report["eval"]["window"] == 16
    capsys.readouterr()
    assert main(["eval", str(out), "--eval", prose, "--eval-windows", "4", "--no-float", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl_quant"] == pytest.approx(report["eval"]["ppl_quant"], rel=1e-6)
    assert main(["run", str(out), "--prompt", "def main():"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "takes exactly 16 tokens a run" in err, err
