"""The bad-input corpus (issue 12): each case exits with status 2 and one stderr line that names the problem
and the way out, with no traceback; it writes nothing (no output, no temporary directory) and leaves every
input file's bytes as they were (sha256 of every file under the inputs, before and after); and (issue 24) it is
refused before the model runs: no calibration, measurement or read-back perplexity has started.

A case is ``(args, problem, fix)``: ``args(c)`` builds the command line from :class:`Inputs` (making any
broken file under ``c.p``), and ``problem`` and ``fix`` are two pieces of the one line. ONNX inputs have
cases of their own beside the ONNX frontend's tests ("onnx": tests/frontends/onnx/test_load_refusals.py,
"forms": its test_exported_forms.py).

The matrix (issue 24): every input of `qpass compile`, `qpass eval` and `qpass run`, and the ways it can be wrong.

- model directory: missing, a dangling link, a link loop, empty (no config.json); config.json empty, cut, not UTF-8,
  a list, without model_type, a count of the wrong type (whole, layer-wise), heads that do not divide the hidden
  size, an unknown or non-causal architecture, remote code; weights missing, pickle-only, truncated, header corrupt,
  a tensor or a shard missing, NaN, shapes config.json does not give, layers config.json does not declare (whole,
  layer-wise), no layers (whole, layer-wise), positions shorter than --window; the tokenizer missing, cut, its
  tokenizer_config.json corrupt, from a newer release (whole, layer-wise), past vocab_size (whole, layer-wise);
  read-only: it compiles (test_read_only_inputs_...). A safetensors file given as MODEL: wrong type.
- GGUF file: empty, truncated, of another format, with --layerwise. Missing and links: the model directory's road.
- ONNX file (onnx): missing, empty, truncated, of another format, opset 16, without input_ids, without attention,
  a sequence axis fixed at another length than --window (and compiled at its own: the fixed-axis test), logits
  that are not one output (forms); external data missing, truncated, hard-linked, a dangling link, outside the
  model's directory (../, absolute, a link out: forms); -o inside the model's directory.
- onnxruntime-genai directory (onnx): genai_config.json not JSON, a list, nulls, a negative or boolean count, a
  context_length shorter than --window; --fa-quant on its GroupQueryAttention.
- tokenizer (--tokenizer, onnx): missing, unparsable, larger than the logits; given for a PyTorch model (here).
- calibration text: missing, a dangling link, a link loop, a directory, empty, whitespace, binary, not UTF-8,
  UTF-16, JSON broken / a list / a number / empty / without its field, shorter than one window; beside --recipe
  (unread). Evaluation text: missing, empty, whitespace, a directory, not UTF-8, the weights file, too short
  (compile and eval); the calibration file itself.
- recipe: missing, a file, empty directory, JSON corrupt / a list / not UTF-8 / another version / an invalid
  config, safetensors truncated, a tensor missing / unknown / of the wrong shape, a scale NaN / 0 / infinite / 1.0
  everywhere, an offset beyond int8, of another model, flags that contradict it, JSON and tensors of two
  calibrations (via a compiled directory).
- compiled output: qpass (missing, a file, empty, program truncated / corrupt, no tokenizer, tokenizer cut, recipe
  corrupt / missing, no decoder.pt2, a corrupt report.json, read-only: it evaluates), MindIE (a tensor missing /
  of the wrong dtype or shape / not described, the description or config.json disagreeing, corrupt or of another
  type, weights missing or truncated, scales NaN / 1.0 / beyond int8, deq_scale wrong, the tokenizer missing or
  unparsable, remote code), vllm-ascend (the same reader: a tensor missing, weights truncated, the description
  corrupt), ONNX (onnx, forms: external data missing or cut, model.onnx cut, no tokenizer, no recipe, an empty
  prompt, a fixed sequence axis for run).
- output path: a file, not empty, the model directory (--force), inside it, holding the calibration file, the
  recipe or the evaluation file, a link to an input, a dangling link, a link loop, under a dangling link, under a
  file, under a directory that is not writable (test_an_output_parent_...), empty, the current directory or above.
- options: each of QuantConfig and RunSettings out of range (window, batch size, calibration and evaluation windows,
  --max-new-tokens: 0, negative, 10^20; percentile, alpha, --max-ppl-increase: out of range, NaN, inf), not a
  number, an unknown choice (--observer, --format, --kv-int8), given where nothing reads it (--symmetric,
  --percentile, --alpha, --max-ppl-increase, --act-method, --observer, --dtype), contradicting each other (--fa-quant
  with the dynamic cache, --anti-method without --w8a8, the formats' own rules, --disable-level past the Linears or
  auto with one window, --format onnx for a PyTorch model); `qpass eval --float MODEL` missing or broken (refused
  before the quantized run).

Cells that do not apply: a GGUF directory, config.json or a recipe file that is a directory (each read as missing,
the cell above); an unreadable file (EACCES) as root, which the tests run as (the read_text road names strerror);
a special file such as a FIFO for --calib / --eval (process substitution, `<(...)`, is one and is accepted);
--window on `qpass eval` (it takes the directory's own). Left open: `qpass run` of an ONNX output past the model's
positions (the graph records no limit; the lowered qpass decoder refuses it), and --eval-windows without --eval
(recorded in the report's run section). --calib-samples with --recipe, which nothing would read, is refused.
"""

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qpass.cli import main
from tests.helpers.refusals import hashes, watch_forward_passes

SMALL = ["--window", "64", "--calib-samples", "4", "--batch-size", "2", "--eval-windows", "4"]
RECIPE_SMALL = ["--window", "64", "--batch-size", "2", "--eval-windows", "4"]  # --recipe: no calibration windows
MINDIE_WEIGHTS, MINDIE_DESCRIPTION = "quant_model_weight_w8a8.safetensors", "quant_model_description.json"


@pytest.fixture(scope="module")
def compiled(tiny_model_dir, text_files, tmp_path_factory):
    """A qpass directory (FAQuant + C8) of the tiny model, to break copies of."""
    out = tmp_path_factory.mktemp("compiled") / "q"
    assert (
        main(
            [
                "compile",
                str(tiny_model_dir),
                "--fa-quant",
                "--kv-int8",
                "--calib",
                str(text_files["calib"]),
                "-o",
                str(out),
                *SMALL,
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def mindie(tiny_model_dir, text_files, tmp_path_factory):
    """A MindIE directory (W8A8 + FAQuant + C8, float16) of the tiny model, to break copies of."""
    out = tmp_path_factory.mktemp("mindie") / "m"
    assert (
        main(
            [
                "compile",
                str(tiny_model_dir),
                "--w8a8",
                "--fa-quant",
                "--kv-int8",
                "--calib",
                str(text_files["calib"]),
                "--format",
                "mindie",
                "-o",
                str(out),
                *SMALL,
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def vllm_ascend(tiny_model_dir, text_files, tmp_path_factory):
    """The same directory in vllm-ascend's form (W8A8 + symmetric C8), to break copies of."""
    out = tmp_path_factory.mktemp("vllm-ascend") / "v"
    args = ["compile", str(tiny_model_dir), "--w8a8", "--kv-int8", "--symmetric", "--format", "vllm-ascend"]
    assert main([*args, "--calib", str(text_files["calib"]), "-o", str(out), *SMALL]) == 0
    return out


@dataclass
class Inputs:
    model: Path  # the tiny model directory
    text: dict  # calib / prose / code files
    p: Path  # where a case makes its broken inputs
    out: Path  # the output path a compile is given
    compiled: Path  # a qpass directory
    mindie: Path  # a MindIE directory
    vllm_ascend: Path  # the same in vllm-ascend's form

    def compile(self, *extra, model=None) -> list[str]:
        """``qpass compile`` of ``model`` (the tiny one) with the small settings, the calibration text unless
        ``extra`` reuses a ``--recipe``, then ``extra`` (later flags win)."""
        if "--recipe" in extra:  # it reads no calibration text nor windows
            return ["compile", str(model or self.model), *RECIPE_SMALL, "-o", str(self.out), *extra]
        return [
            "compile",
            str(model or self.model),
            *SMALL,
            "--calib",
            str(self.text["calib"]),
            "-o",
            str(self.out),
            *extra,
        ]

    def file(self, name: str, data: bytes | str) -> str:
        path = self.p / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return str(path)

    def copy(self, src: Path, name: str) -> Path:
        dst = self.p / name
        shutil.copytree(src, dst)
        return dst


# a tokenizer.json in a form the installed tokenizers does not know (as a newer release may write)
NEWER_TOKENIZER = json.dumps({"version": "9.0", "model": {"type": "FromTheFuture", "vocab": {}}}).encode()


# --- helpers that break a copy of an input ------------------------------------------------------------------


def link(c: Inputs, name: str, target: Path | str) -> str:
    """A symbolic link ``name`` among the case's inputs, to ``target`` (which need not exist)."""
    path = c.p / name
    path.symlink_to(target)
    return str(path)


def model_with(c: Inputs, config=None, drop=(), add=None, truncate=None, weights=None) -> str:
    """A copy of the tiny model: ``config(doc)`` edits config.json (or ``config`` is its new bytes), files in
    ``drop`` removed, ``add`` {name: bytes} added, file ``truncate`` cut to half, ``weights(dict)`` edits the
    safetensors tensors."""
    d = c.copy(c.model, "model")
    if weights is not None:
        t = load_file(d / "model.safetensors")
        save_file(weights(t) or t, d / "model.safetensors", metadata={"format": "pt"})
    if callable(config):
        doc = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(config(doc) or doc))
    elif config is not None:
        (d / "config.json").write_bytes(config)
    for name in drop:
        (d / name).unlink()
    for name, data in (add or {}).items():
        (d / name).write_bytes(data)
    if truncate:
        data = (d / truncate).read_bytes()
        (d / truncate).write_bytes(data[: len(data) // 2])
    return str(d)


def sharded(c: Inputs, drop: int | None = None) -> str:
    """A copy of the tiny model with its weights in two shards and an index (``model.safetensors.index.json``), shard
    ``drop`` (0 or 1) removed."""
    d = c.copy(c.model, "model")
    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names, weight_map = sorted(tensors), {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, d / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
        if i == drop:
            (d / shard).unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return str(d)


def edit(doc: dict, **changes) -> dict:
    doc.update(changes)
    return doc


def without(doc: dict, *keys) -> dict:
    for key in keys:
        doc.pop(key, None)
    return doc


def recipe_with(c: Inputs, tensors=None, doc=None, raw_json=None, truncate=False) -> str:
    """A copy of the compiled recipe/: ``tensors(dict)`` edits its tensors, ``doc(dict)`` its JSON (or
    ``raw_json`` replaces it), ``truncate`` halves the safetensors file."""
    d = c.copy(c.compiled / "recipe", "recipe")
    if tensors is not None:
        t = load_file(d / "recipe.safetensors")
        save_file(tensors(t) or t, d / "recipe.safetensors")
    if doc is not None:
        j = json.loads((d / "recipe.json").read_text())
        (d / "recipe.json").write_text(json.dumps(doc(j) or j))
    if raw_json is not None:
        (d / "recipe.json").write_bytes(raw_json)
    if truncate:
        data = (d / "recipe.safetensors").read_bytes()
        (d / "recipe.safetensors").write_bytes(data[: len(data) // 2])
    return str(d)


def set_tensor(name: str, value) -> callable:
    """A ``tensors`` edit: ``name`` becomes ``value(old)``."""

    def change(t):
        t[name] = value(t[name])

    return change


def compiled_with(c: Inputs, drop=(), truncate=None, recipe_json=None, raw=None) -> str:
    """A copy of the qpass directory: files in ``drop`` removed, file ``truncate`` halved, ``recipe_json`` its
    recipe's JSON, ``raw`` {name: bytes} replacing files."""
    d = c.copy(c.compiled, "compiled")
    for name, data in (raw or {}).items():
        (d / name).write_bytes(data)
    for name in drop:
        path = d / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if truncate:
        data = (d / truncate).read_bytes()
        (d / truncate).write_bytes(data[: len(data) // 2])
    if recipe_json is not None:
        (d / "recipe/recipe.json").write_bytes(recipe_json)
    return str(d)


def mindie_with(
    c: Inputs, tensors=None, description=None, config=None, drop=(), truncate=None, raw=None, source=None
) -> str:
    """A copy of the MindIE directory (or ``source``) with ``tensors(dict)``, ``description(dict)``, ``config(dict)``
    edits, files in ``drop`` removed, file ``truncate`` halved, ``raw`` {name: bytes} replacing files."""
    d = c.copy(source or c.mindie, "mindie")
    if tensors is not None:
        t = load_file(d / MINDIE_WEIGHTS)
        save_file(tensors(t) or t, d / MINDIE_WEIGHTS, metadata={"format": "pt"})
    for name, change in ((MINDIE_DESCRIPTION, description), ("config.json", config)):
        if change is not None:
            doc = json.loads((d / name).read_text())
            (d / name).write_text(json.dumps(change(doc) or doc))
    for name in drop:
        (d / name).unlink()
    if truncate:
        data = (d / truncate).read_bytes()
        (d / truncate).write_bytes(data[: len(data) // 2])
    for name, data in (raw or {}).items():
        (d / name).write_bytes(data)
    return str(d)


def mindie_eval(c: Inputs, d: str) -> list[str]:
    return ["eval", d, "--eval", str(c.text["prose"]), "--eval-windows", "2"]


FA_K = "model.layers.0.self_attn.fa_k.scale"
C8_V = "model.layers.1.self_attn.v_proj.kv_cache_scale"
C8_K_OFFSET = "model.layers.0.self_attn.k_proj.kv_cache_offset"
NORM = "model.layers.0.input_layernorm.weight"
DOWN = "model.layers.1.mlp.down_proj"
PICKLE = b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01w\x94K\x01s."  # pickle.dumps({"w": 1})
BINARY = bytes(range(256)) * 8
CORRUPT_SAFETENSORS = (2**40).to_bytes(8, "little") + b"{}"  # a header length far beyond the file
GOOD_LINE = json.dumps({"text": "A sentence long enough to be a calibration sample. " * 40}) + "\n"

CASES = {
    # --- options: out of range, incompatible, nothing to quantize --------------------------------------------
    "nothing to quantize": (lambda c: c.compile(), "nothing to quantize", "--fa-quant / --kv-int8 / --w8a8"),
    "window 0": (lambda c: c.compile("--kv-int8", "--window", "0"), "--window 0: must be an integer", "at least 1"),
    "window beyond the model's positions": (
        lambda c: c.compile("--kv-int8", "--window", "1024"),
        "--window 1024: longer than",
        "--window 512 or less",
    ),
    "batch size 0": (lambda c: c.compile("--kv-int8", "--batch-size", "0"), "--batch-size 0", "at least 1"),
    "calib samples negative": (
        lambda c: c.compile("--kv-int8", "--calib-samples", "-3"),
        "--calib-samples -3",
        "at least 1",
    ),
    "eval windows 0": (
        lambda c: c.compile("--kv-int8", "--eval", str(c.text["prose"]), "--eval-windows", "0"),
        "--eval-windows 0",
        "at least 1",
    ),
    "percentile out of range": (
        lambda c: c.compile("--kv-int8", "--observer", "percentile", "--percentile", "150"),
        "percentile=150.0",
        "(50, 100]",
    ),
    "alpha out of range": (
        lambda c: c.compile("--w8a8", "--anti-method", "m1", "--alpha", "1.5"),
        "alpha=1.5",
        "[0, 1]",
    ),
    "disable level malformed": (
        lambda c: c.compile("--w8a8", "--disable-level", "L-1"),
        "disable_level='L-1'",
        "L0, Ln",
    ),
    "max ppl increase 0": (
        lambda c: c.compile("--w8a8", "--max-ppl-increase", "0"),
        "max_ppl_increase=0.0",
        "positive",
    ),
    "anti-method without w8a8": (
        lambda c: c.compile("--kv-int8", "--anti-method", "m1"),
        "apply to W8A8 only",
        "--w8a8",
    ),
    "fa-quant with dynamic cache": (
        lambda c: c.compile("--fa-quant", "--kv-int8", "dynamic"),
        "FAQuant fixes the cache",
        "drop --fa-quant",
    ),
    "window not a number": (
        lambda c: c.compile("--kv-int8", "--window", "wide"),
        "invalid int value: 'wide'",
        "qpass compile --help",
    ),
    "observer unknown": (
        lambda c: c.compile("--kv-int8", "--observer", "max"),
        "invalid choice: 'max'",
        "qpass compile --help",
    ),
    "format unknown": (
        lambda c: c.compile("--kv-int8", "--format", "onnx-ascend"),
        "invalid choice: 'onnx-ascend'",
        "qpass compile --help",
    ),
    "vllm-ascend with fa-quant": (
        lambda c: c.compile("--w8a8", "--fa-quant", "--format", "vllm-ascend"),
        "vllm-ascend loads attention quantization only as FAKQuant",
        "drop --fa-quant",
    ),
    "vllm-ascend asymmetric C8": (
        lambda c: c.compile("--w8a8", "--kv-int8", "--format", "vllm-ascend"),
        "C8 must be symmetric",
        "add --symmetric",
    ),
    "mindie without w8a8": (
        lambda c: c.compile("--kv-int8", "--format", "mindie"),
        "the MindIE format is W8A8",
        "add --w8a8",
    ),
    "mindie with dynamic cache": (
        lambda c: c.compile("--w8a8", "--kv-int8", "dynamic", "--format", "mindie"),
        "holds only a static int8 KV cache",
        "--kv-int8 (static)",
    ),
    "dtype with qpass format": (
        lambda c: c.compile("--kv-int8", "--dtype", "float16"),
        "only --format mindie / vllm-ascend",
        "drop --dtype",
    ),
    "bfloat16 with C8": (
        lambda c: c.compile("--w8a8", "--kv-int8", "--format", "mindie", "--dtype", "bfloat16"),
        "documented for float16 weights only",
        "use --dtype float16",
    ),
    "recipe with calibration windows": (
        lambda c: c.compile("--recipe", str(c.compiled / "recipe"), "--calib-samples", "4"),
        "--recipe reuses a calibration, so no calibration windows are read",
        "drop --calib-samples",
    ),
    "recipe with other options": (
        lambda c: c.compile("--w8a8", "--recipe", str(c.compiled / "recipe")),
        "calibrated otherwise than --w8a8 (w8a8=None in the recipe)",
        "drop those flags",
    ),
    "config declares fewer layers than the weights hold": (
        lambda c: c.compile("--kv-int8", model=model_with(c, config=lambda d: edit(d, num_hidden_layers=1))),
        "weight model.layers.1.",
        "repair num_hidden_layers or re-download",
    ),
    "config declares fewer layers than the weights hold, layer-wise": (
        lambda c: c.compile(
            "--kv-int8", "--layerwise", model=model_with(c, config=lambda d: edit(d, num_hidden_layers=1))
        ),
        "config.json has num_hidden_layers 1",
        "repair num_hidden_layers or re-download",
    ),
    "config declares no layers, layer-wise": (
        lambda c: c.compile(
            "--kv-int8", "--layerwise", model=model_with(c, config=lambda d: edit(d, num_hidden_layers=0))
        ),
        "num_hidden_layers 0, so there is no attention",
        "repair config.json",
    ),
    "batch size far beyond any run": (
        lambda c: c.compile("--kv-int8", "--batch-size", str(10**20)),
        f"--batch-size {10**20}: must be an integer, at least 1 and at most",
        "at most 2147483647",
    ),
    "run with far too many tokens": (
        lambda c: ["run", str(c.compiled), "--prompt", "x", "--max-new-tokens", str(10**20)],
        f"--max-new-tokens {10**20}",
        "at most 2147483647",
    ),
    "an infinite perplexity budget": (
        lambda c: c.compile("--w8a8", "--disable-level", "auto", "--max-ppl-increase", "inf"),
        "max_ppl_increase=inf",
        "is not a finite number",
    ),
    "symmetric with the dynamic cache alone": (
        lambda c: c.compile("--kv-int8", "dynamic", "--symmetric"),
        "applies to the calibrated attention scales",
        "drop --symmetric",
    ),
    "symmetric with W8A8 alone": (
        lambda c: c.compile("--w8a8", "--symmetric"),
        "W8A8's activations are asymmetric per tensor",
        "drop --symmetric",
    ),
    "output is a file": (
        lambda c: c.compile("--kv-int8", "-o", c.file("taken", "x")),
        "exists and is not a directory",
        "choose another output path",
    ),
    "output not empty": (
        lambda c: c.compile("--kv-int8", "-o", str(Path(c.file("keep.txt", "mine")).parent)),
        "directory exists and is not empty",
        "pass --force",
    ),
    "output is the model directory, with --force": (
        lambda c: c.compile("--kv-int8", "-o", str(c.model), "--force"),
        "is the input",
        "choose an output path outside every input",
    ),
    "output inside the model directory": (
        lambda c: c.compile("--kv-int8", "-o", str(c.model / "out")),
        "lies inside the input",
        "an input is never replaced or written into",
    ),
    "output holds the calibration file, with --force": (
        lambda c: c.compile("--kv-int8", "-o", str(Path(c.text["calib"]).parent), "--force"),
        "holds the input",
        "choose an output path outside every input",
    ),
    "output is a link to the model directory, with --force": (
        lambda c: c.compile("--kv-int8", "-o", link(c, "to-model", c.model), "--force"),
        "is a symbolic link",
        "give the real path",
    ),
    "output is a dangling link": (
        lambda c: c.compile("--kv-int8", "-o", link(c, "dangling", c.p / "nowhere")),
        "is a symbolic link to nothing (or a loop)",
        "give the real path of a new or empty directory",
    ),
    "output is a link loop": (
        lambda c: c.compile("--kv-int8", "-o", link(c, "a", link(c, "b", c.p / "a"))),
        "is a symbolic link to nothing (or a loop)",
        "give the real path",
    ),
    "output under a dangling link": (
        lambda c: c.compile("--kv-int8", "-o", link(c, "gone", c.p / "nowhere") + "/out"),
        "which is a symbolic link to nothing",
        "give the real path",
    ),
    "output under a file": (
        lambda c: c.compile("--kv-int8", "-o", c.file("f", "x") + "/out"),
        "not a writable directory",
        "choose an output path you can write",
    ),
    "run with no new tokens": (
        lambda c: ["run", str(c.compiled), "--prompt", "Hello", "--max-new-tokens", "0"],
        "--max-new-tokens 0",
        "at least 1",
    ),
    "eval with 0 windows": (
        lambda c: ["eval", str(c.compiled), "--eval", str(c.text["prose"]), "--eval-windows", "0"],
        "--eval-windows 0",
        "at least 1",
    ),
    # --- calibration and evaluation files --------------------------------------------------------------------
    "calib empty": (
        lambda c: c.compile("--kv-int8", "--calib", c.file("c.jsonl", b"")),
        "is empty",
        "a file with text",
    ),
    "calib whitespace": (
        lambda c: c.compile("--kv-int8", "--calib", c.file("c.txt", " \n\t\n  \r\n")),
        "is empty",
        "a file with text",
    ),
    "calib not JSON": (
        lambda c: c.compile("--kv-int8", "--calib", c.file("c.jsonl", GOOD_LINE + "{oops\n")),
        "line 2 is not JSON",
        "each line must be an object",
    ),
    "calib line a list": (
        lambda c: c.compile("--kv-int8", "--calib", c.file("c.jsonl", '["text", "a"]\n')),
        "line 1 is a JSON list, not an object",
        "each line must be an object",
    ),
    "calib text a number": (
        lambda c: c.compile("--kv-int8", "--calib", c.file("c.jsonl", GOOD_LINE + '{"text": 5}\n')),
        "line 2: 'text' is not a non-empty string",
        "each line must be an object",
    ),
    "calib text empty": (
        lambda c: c.compile("--kv-int8", "--calib", c.file("c.jsonl", '{"inputs_pretokenized": " "}\n')),
        "line 1: 'inputs_pretokenized' is not a non-empty string",
        "each line must be an object",
    ),
    "calib missing field": (
        lambda c: c.compile("--kv-int8", "--calib", c.file("c.jsonl", '{"prompt": "a"}\n')),
        "line 1 has no 'inputs_pretokenized' or 'text' field",
        "each line must be an object",
    ),
    "calib not UTF-8": (
        lambda c: c.compile("--kv-int8", "--calib", c.file("c.txt", b"caf\xe9 au lait\n" * 50)),
        "not UTF-8 (byte 3, line 1)",
        "iconv -t utf-8",
    ),
    "calib UTF-16": (
        lambda c: c.compile("--kv-int8", "--calib", c.file("c.txt", "some text\n".encode("utf-16"))),
        "not UTF-8",
        "iconv -t utf-8",
    ),
    "calib binary": (
        lambda c: c.compile("--kv-int8", "--calib", c.file("c.jsonl", BINARY)),
        "not UTF-8",
        "iconv -t utf-8",
    ),
    "calib a directory": (
        lambda c: c.compile("--kv-int8", "--calib", str(c.p)),
        "--calib: cannot read",
        "check the path",
    ),
    "calib missing": (
        lambda c: c.compile("--kv-int8", "--calib", str(c.p / "nope.jsonl")),
        "does not exist",
        "give the path of a UTF-8 text file",
    ),
    "calib shorter than a window": (
        lambda c: c.compile("--kv-int8", "--calib", c.file("c.txt", "Just a few words.")),
        "shorter than one window of 64",
        "give more text or a smaller --window",
    ),
    "eval empty": (
        lambda c: c.compile("--kv-int8", "--eval", c.file("e.txt", b"")),
        "--eval: e.txt is empty",
        "a file with text",
    ),
    "eval whitespace": (
        lambda c: c.compile("--kv-int8", "--eval", c.file("e.txt", "\n\n   \n")),
        "--eval: e.txt is empty",
        "a file with text",
    ),
    "eval a directory": (lambda c: c.compile("--kv-int8", "--eval", str(c.p)), "--eval: cannot read", "check the path"),
    "eval not UTF-8": (
        lambda c: c.compile("--kv-int8", "--eval", c.file("e.txt", b"\xff\xfe\x00t\x00e")),
        "not UTF-8",
        "iconv -t utf-8",
    ),
    "eval is the weights file": (
        lambda c: c.compile("--kv-int8", "--eval", str(c.model / "model.safetensors")),
        "model.safetensors is not UTF-8",
        "iconv -t utf-8",
    ),
    "eval too short": (
        lambda c: c.compile("--kv-int8", "--eval", c.file("e.txt", "Too short to fill a window.")),
        "shorter than one window",
        "give more text or a smaller --window",
    ),
    "eval command, eval too short": (
        lambda c: ["eval", str(c.compiled), "--eval", c.file("e.txt", "Too short to fill a window.")],
        "shorter than one window of 64",
        "give more text (the directory runs over the window it was compiled for)",
    ),
    "eval command, eval empty": (
        lambda c: ["eval", str(c.compiled), "--eval", c.file("e.txt", "")],
        "is empty",
        "a file with text",
    ),
    "eval command, eval missing": (
        lambda c: ["eval", str(c.compiled), "--eval", str(c.p / "e.txt")],
        "does not exist",
        "give the path of a UTF-8 text file",
    ),
    # --- model inputs ----------------------------------------------------------------------------------------
    "model missing": (
        lambda c: c.compile("--kv-int8", model=c.p / "no-such-model"),
        "no such file or directory",
        "give a Hugging Face model directory",
    ),
    "model dir without config": (
        lambda c: c.compile("--kv-int8", model=c.p),
        "no config.json",
        "config.json + *.safetensors",
    ),
    "config not JSON": (
        lambda c: c.compile("--kv-int8", model=model_with(c, config=b'{"model_type": "llama",')),
        "config.json is not valid JSON",
        "repair or re-download",
    ),
    "config empty": (
        lambda c: c.compile("--kv-int8", model=model_with(c, config=b"")),
        "config.json is not valid JSON",
        "repair or re-download",
    ),
    "config a list": (
        lambda c: c.compile("--kv-int8", model=model_with(c, config=b"[1, 2]")),
        "config.json is not a JSON object",
        "repair or re-download",
    ),
    "config not UTF-8": (
        lambda c: c.compile("--kv-int8", model=model_with(c, config=b'{"model_type": "ll\xe1ma"}')),
        "config.json is not valid JSON",
        "repair or re-download",
    ),
    "config without model_type": (
        lambda c: c.compile("--kv-int8", model=model_with(c, config=lambda d: without(d, "model_type"))),
        "cannot load this model",
        "check config.json",
    ),
    "config of an unknown architecture": (
        lambda c: c.compile(
            "--kv-int8",
            model=model_with(
                c, config=lambda d: edit(d, model_type="llama-next", architectures=["LlamaNextForCausalLM"])
            ),
        ),
        "cannot load this model",
        "check config.json",
    ),
    "config of a model that is not a causal LM": (
        lambda c: c.compile(
            "--kv-int8",
            model=model_with(
                c, config=lambda d: edit(d, model_type="t5", architectures=["T5ForConditionalGeneration"])
            ),
        ),
        "cannot load this model",
        "check config.json",
    ),
    "config that disagrees with the weights": (
        lambda c: c.compile("--kv-int8", model=model_with(c, config=lambda d: edit(d, hidden_size=128, head_dim=32))),
        "weight lm_head.weight is [49152, 64] in the safetensors files but config.json makes it [49152, 128]",
        "repair config.json or re-download the model",
    ),
    "weights missing a tensor": (
        lambda c: c.compile(
            "--kv-int8", model=model_with(c, weights=lambda t: without(t, "model.layers.1.mlp.up_proj.weight"))
        ),
        "weight model.layers.1.mlp.up_proj.weight is not in the safetensors files",
        "re-download the model",
    ),
    "remote code only": (
        lambda c: c.compile(
            "--kv-int8",
            model=model_with(
                c, config=lambda d: edit(d, model_type="my-own", auto_map={"AutoModelForCausalLM": "m.M"})
            ),
        ),
        "never runs remote code",
        "set model_type to",
    ),
    "remote code without model_type": (
        lambda c: c.compile(
            "--kv-int8",
            model=model_with(
                c, config=lambda d: edit(without(d, "model_type"), auto_map={"AutoModelForCausalLM": "m.M"})
            ),
        ),
        "model_type None has no built-in architecture",
        "set model_type to",
    ),
    "weights missing": (
        lambda c: c.compile("--kv-int8", model=model_with(c, drop=["model.safetensors"])),
        "no *.safetensors weights",
        "convert them to safetensors",
    ),
    "pickle-only checkpoint": (
        lambda c: c.compile(
            "--kv-int8", model=model_with(c, drop=["model.safetensors"], add={"pytorch_model.bin": PICKLE})
        ),
        "no *.safetensors weights",
        "qpass never unpickles .bin files",
    ),
    "weights truncated": (
        lambda c: c.compile("--kv-int8", model=model_with(c, truncate="model.safetensors")),
        "cannot load this model",
        "check config.json, the tokenizer files and the safetensors weights",
    ),
    "weights header corrupt": (
        lambda c: c.compile("--kv-int8", model=model_with(c, add={"model.safetensors": CORRUPT_SAFETENSORS})),
        "cannot load this model",
        "the safetensors weights",
    ),
    "tokenizer missing": (
        lambda c: c.compile("--kv-int8", model=model_with(c, drop=["tokenizer.json", "tokenizer_config.json"])),
        "cannot load the tokenizer",
        "the tokenizer files",
    ),
    "tokenizer from a release this one cannot parse": (
        lambda c: c.compile("--kv-int8", model=model_with(c, add={"tokenizer.json": NEWER_TOKENIZER})),
        "cannot load the tokenizer",
        "re-save them with the installed transformers / tokenizers",
    ),
    "tokenizer from a release this one cannot parse, layer-wise": (
        lambda c: c.compile("--kv-int8", "--layerwise", model=model_with(c, add={"tokenizer.json": NEWER_TOKENIZER})),
        "cannot load the tokenizer",
        "re-save them",
    ),
    "mindie tokenizer from a release this one cannot parse": (
        lambda c: mindie_eval(c, mindie_with(c, raw={"tokenizer.json": NEWER_TOKENIZER})),
        "cannot load the tokenizer",
        "re-save them",
    ),
    "tokenizer larger than the vocabulary": (
        lambda c: c.compile("--kv-int8", model=model_with(c, config=lambda d: edit(d, vocab_size=1000))),
        "the tokenizer has 49152 tokens but the model's vocabulary (vocab_size) is 1000",
        "give the model's own tokenizer",
    ),
    "tokenizer larger than the vocabulary, layer-wise": (
        lambda c: c.compile("--kv-int8", "--layerwise", model=model_with(c, config=lambda d: edit(d, vocab_size=1000))),
        "but the model's vocabulary (vocab_size) is 1000",
        "give the model's own tokenizer",
    ),
    "model is a safetensors file": (
        lambda c: c.compile("--kv-int8", model=c.model / "model.safetensors"),
        "not a .gguf file or a model directory",
        "give a Hugging Face model directory",
    ),
    "gguf truncated": (
        lambda c: c.compile("--kv-int8", model=c.file("m.gguf", b"GGUF\x03\x00\x00\x00\x10")),
        "cannot read this GGUF file",
        "check that it is a complete GGUF model",
    ),
    "gguf empty": (
        lambda c: c.compile("--kv-int8", model=c.file("m.gguf", b"")),
        "cannot read this GGUF file",
        "check that it is a complete GGUF model",
    ),
    "gguf of another format": (
        lambda c: c.compile("--kv-int8", model=c.file("m.gguf", PICKLE * 4)),
        "cannot read this GGUF file",
        "check that it is a complete GGUF model",
    ),
    "inspect a broken config": (
        lambda c: ["inspect", model_with(c, config=b"\x00\x01")],
        "config.json is not valid JSON",
        "repair or re-download",
    ),
    # --- recipes and compiled directories --------------------------------------------------------------------
    "recipe directory empty": (
        lambda c: c.compile("--recipe", str(c.p)),
        "needs recipe.json and recipe.safetensors",
        "give a directory written by `qpass compile`",
    ),
    "recipe JSON corrupt": (
        lambda c: c.compile("--recipe", recipe_with(c, raw_json=b'{"version": 2, "config"')),
        "recipe.json is not a qpass recipe",
        "recalibrate",
    ),
    "recipe JSON a list": (
        lambda c: c.compile("--recipe", recipe_with(c, raw_json=b"[]")),
        "recipe.json is not a qpass recipe",
        "recalibrate",
    ),
    "recipe JSON not UTF-8": (
        lambda c: c.compile("--recipe", recipe_with(c, raw_json=b'{"version": "\xff"}')),
        "recipe.json is not a qpass recipe",
        "recalibrate",
    ),
    "recipe of another version": (
        lambda c: c.compile("--recipe", recipe_with(c, doc=lambda d: edit(d, version=1))),
        "recipe version 1 is not 2",
        "recalibrate with this qpass",
    ),
    "recipe config invalid": (
        lambda c: c.compile("--recipe", recipe_with(c, doc=lambda d: edit(d, config={"fa_quant": "yes"}))),
        "recipe.json is not a qpass recipe",
        "recalibrate",
    ),
    "recipe tensors truncated": (
        lambda c: c.compile("--recipe", recipe_with(c, truncate=True)),
        "cannot read recipe.safetensors",
        "recalibrate",
    ),
    "recipe scale NaN": (
        lambda c: c.compile(
            "--recipe",
            recipe_with(
                c, tensors=set_tensor("layers.1.kv_v.scale", lambda t: t.index_fill(0, torch.tensor([5]), float("nan")))
            ),
        ),
        "layers.1.kv_v.scale has a scale that is NaN",
        "recalibrate",
    ),
    "recipe scale zero": (
        lambda c: c.compile(
            "--recipe",
            recipe_with(
                c, tensors=set_tensor("layers.0.fa_q.scale", lambda t: t.index_fill(1, torch.tensor([3]), 0.0))
            ),
        ),
        "layers.0.fa_q.scale has a scale that is zero or negative",
        "recalibrate",
    ),
    "recipe scale infinite": (
        lambda c: c.compile(
            "--recipe",
            recipe_with(
                c, tensors=set_tensor("layers.0.kv_k.scale", lambda t: t.index_fill(0, torch.tensor([0]), float("inf")))
            ),
        ),
        "layers.0.kv_k.scale has a scale that is infinite",
        "recalibrate",
    ),
    "recipe scale 1.0 everywhere": (
        lambda c: c.compile("--recipe", recipe_with(c, tensors=set_tensor("layers.1.fa_k.scale", torch.ones_like))),
        "layers.1.fa_k.scale is 1.0 in every channel",
        "recalibrate",
    ),
    "recipe offset beyond int8": (
        lambda c: c.compile("--recipe", recipe_with(c, tensors=set_tensor("layers.0.kv_v.offset", lambda t: t + 300))),
        "layers.0.kv_v.offset has an offset",
        "[-128, 127]",
    ),
    "recipe tensor missing": (
        lambda c: c.compile(
            "--recipe", recipe_with(c, tensors=lambda t: without(t, "layers.1.kv_k.scale", "layers.1.kv_k.offset"))
        ),
        "no layers.1.kv_k.scale/.offset",
        "recalibrate",
    ),
    "recipe tensor unknown": (
        lambda c: c.compile(
            "--recipe", recipe_with(c, tensors=lambda t: edit(t, **{"layers.0.kv_x.scale": torch.ones(4)}))
        ),
        "layers.0.kv_x.scale is not one a recipe holds",
        "recalibrate",
    ),
    "recipe tensor of the wrong shape": (
        lambda c: c.compile(
            "--recipe", recipe_with(c, tensors=set_tensor("layers.0.fa_v.scale", lambda t: t.flatten()))
        ),
        "layers.0.fa_v.scale has shape [32]",
        "recalibrate",
    ),
    "recipe for another model": (
        lambda c: c.compile(
            "--recipe", recipe_with(c, doc=lambda d: edit(d, sites=[{**s, "num_heads": 8} for s in d["sites"]]))
        ),
        "calibrated for another model (layer 0: recipe 8 heads, 2 kv heads, head_dim 16 at "
        "model.layers.0.self_attn vs model "
        "4 heads",
        "calibrate this model",
    ),
    "eval of an empty directory": (
        lambda c: ["eval", str(c.p), "--eval", str(c.text["prose"])],
        "not a directory written by `qpass compile -o`",
        "give one of those",
    ),
    "eval of a truncated program": (
        lambda c: mindie_eval(c, compiled_with(c, truncate="program.pt2")),
        "program.pt2: cannot load this saved program",
        "recompile into a fresh directory",
    ),
    "eval without tokenizer": (
        lambda c: mindie_eval(c, compiled_with(c, drop=["tokenizer"])),
        "compiled: no tokenizer/",
        "recompile into a fresh directory",
    ),
    "eval with a corrupt recipe": (
        lambda c: mindie_eval(c, compiled_with(c, recipe_json=b"\x00")),
        "recipe.json is not a qpass recipe",
        "recalibrate",
    ),
    "eval without recipe": (
        lambda c: mindie_eval(c, compiled_with(c, drop=["recipe"])),
        "needs recipe.json",
        "give a directory written by `qpass compile`",
    ),
    "run without decoder": (
        lambda c: ["run", str(c.compiled), "--prompt", "Hello"],
        "no decoder.pt2",
        "for a model whose attention the paged int8 ops support",
    ),
    # --- MindIE directories ----------------------------------------------------------------------------------
    "mindie tensor missing": (
        lambda c: mindie_eval(c, mindie_with(c, tensors=lambda t: without(t, FA_K))),
        f"lists {FA_K} (FAQuant), but quant_model_weight_w8a8.safetensors has no such tensor",
        "add the tensor or re-export",
    ),
    "mindie tensor of the wrong dtype": (
        lambda c: mindie_eval(c, mindie_with(c, tensors=set_tensor(NORM, torch.Tensor.float))),
        f"tensor {NORM} is float32, expected float16",
        "re-export it in that dtype",
    ),
    "mindie tensor of the wrong shape": (
        lambda c: mindie_eval(c, mindie_with(c, tensors=set_tensor(NORM, lambda t: t[:32]))),
        f"tensor {NORM} has shape [32], expected [64]",
        "does not fit this model's config.json",
    ),
    "mindie tensor not described": (
        lambda c: mindie_eval(c, mindie_with(c, description=lambda d: without(d, NORM))),
        f"tensor {NORM} has no entry",
        "type every tensor",
    ),
    "mindie description types a W8A8 weight FLOAT": (
        lambda c: mindie_eval(c, mindie_with(c, description=lambda d: edit(d, **{f"{DOWN}.weight": "FLOAT"}))),
        f"tensor {DOWN}.weight is int8, but quant_model_description.json types it 'FLOAT'",
        "type it 'W8A8'",
    ),
    "mindie description without C8": (
        lambda c: mindie_eval(c, mindie_with(c, description=lambda d: without(d, "kv_cache_type", "kv_quant_type"))),
        "disagrees with quant_model_description.json",
        "make them agree",
    ),
    "mindie description not JSON": (
        lambda c: mindie_eval(c, mindie_with(c, raw={MINDIE_DESCRIPTION: b"{"})),
        "quant_model_description.json is not valid JSON",
        "re-export the directory",
    ),
    "mindie description a list": (
        lambda c: mindie_eval(c, mindie_with(c, raw={MINDIE_DESCRIPTION: b"[]"})),
        "quant_model_description.json is not a JSON object",
        "re-export the directory",
    ),
    "mindie description of another quant type": (
        lambda c: mindie_eval(c, mindie_with(c, description=lambda d: edit(d, model_quant_type="W4A16"))),
        "model_quant_type is 'W4A16'",
        "qpass loads W8A8",
    ),
    "mindie config of another dtype": (
        lambda c: mindie_eval(c, mindie_with(c, config=lambda d: edit(d, torch_dtype="float32"))),
        "torch_dtype is 'float32'",
        "float16 or bfloat16",
    ),
    "mindie config of an unknown architecture": (
        lambda c: mindie_eval(c, mindie_with(c, config=lambda d: edit(d, model_type="llama-next"))),
        "model_type 'llama-next' is not an architecture transformers has built in",
        "give the directory of a causal LM of a built-in architecture",
    ),
    "mindie config asks for remote code": (
        lambda c: mindie_eval(
            c, mindie_with(c, config=lambda d: edit(d, model_type="my-own", auto_map={"AutoModelForCausalLM": "m.M"}))
        ),
        "qpass never runs remote code",
        "set model_type to",
    ),
    "mindie config disagrees": (
        lambda c: mindie_eval(c, mindie_with(c, config=lambda d: edit(d, quantization_config={"kv_quant_type": None}))),
        "disagrees with quant_model_description.json",
        "make them agree",
    ),
    "mindie weights missing": (
        lambda c: mindie_eval(c, mindie_with(c, drop=[MINDIE_WEIGHTS])),
        f"no {MINDIE_WEIGHTS}",
        "a MindIE directory needs",
    ),
    "mindie weights truncated": (
        lambda c: mindie_eval(c, mindie_with(c, truncate=MINDIE_WEIGHTS)),
        f"cannot read {MINDIE_WEIGHTS}",
        "re-export the directory",
    ),
    "mindie C8 scale NaN": (
        lambda c: mindie_eval(
            c, mindie_with(c, tensors=set_tensor(C8_V, lambda t: t.index_fill(0, torch.tensor([2]), float("nan"))))
        ),
        f"{C8_V} (C8 v_proj kv_cache_scale) has a value",
        "recalibrate",
    ),
    "mindie C8 scale 1.0 everywhere": (
        lambda c: mindie_eval(c, mindie_with(c, tensors=set_tensor(C8_V, torch.ones_like))),
        f"{C8_V} (C8 v_proj kv_cache_scale) is 1.0 in every channel",
        "recalibrate",
    ),
    "mindie C8 offset beyond int8": (
        lambda c: mindie_eval(c, mindie_with(c, tensors=set_tensor(C8_K_OFFSET, lambda t: t + 200))),
        f"{C8_K_OFFSET} (C8 k_proj kv_cache_offset) has a value",
        "[-128, 127]",
    ),
    "mindie W8A8 input offset beyond int8": (
        lambda c: mindie_eval(c, mindie_with(c, tensors=set_tensor(f"{DOWN}.input_offset", lambda t: t + 1000))),
        f"{DOWN}.input_offset (a W8A8 input_offset) has a value",
        "[-128, 127]",
    ),
    "mindie deq_scale disagrees": (
        lambda c: mindie_eval(c, mindie_with(c, tensors=set_tensor(f"{DOWN}.deq_scale", lambda t: t + (1 << 23)))),
        f"{DOWN}.deq_scale[",
        "store input_scale * weight_scale",
    ),
    "mindie tokenizer missing": (
        lambda c: mindie_eval(c, mindie_with(c, drop=["tokenizer.json", "tokenizer_config.json"])),
        "cannot load the tokenizer",
        "add tokenizer.json",
    ),
    # --- issue 24's matrix: the cells the corpus lacked (see the module docstring) ----------------------------
    "kv-int8 of an unknown form": (
        lambda c: c.compile("--kv-int8", "int4"),
        "'int4' is not static or dynamic",
        "qpass compile --help",
    ),
    "percentile not a number": (
        lambda c: c.compile("--kv-int8", "--observer", "percentile", "--percentile", "nan"),
        "percentile=nan is not a finite number",
        "is not a finite number",
    ),
    "alpha not a number": (
        lambda c: c.compile("--w8a8", "--anti-method", "m1", "--alpha", "nan"),
        "alpha=nan is not a finite number",
        "is not a finite number",
    ),
    "percentile without the percentile observer": (
        lambda c: c.compile("--kv-int8", "--percentile", "99.9"),
        "percentile=99.9 applies to observer='percentile'",
        "--observer percentile",
    ),
    "alpha without m1 or m2": (
        lambda c: c.compile("--w8a8", "--anti-method", "m3", "--alpha", "0.8"),
        "alpha=0.8 applies to anti_method m1 or m2",
        "drop --alpha",
    ),
    "max ppl increase without disable level auto": (
        lambda c: c.compile("--w8a8", "--max-ppl-increase", "5"),
        "max_ppl_increase=5.0 applies to disable_level='auto'",
        "--disable-level auto",
    ),
    "act method without w8a8": (
        lambda c: c.compile("--kv-int8", "--act-method", "2"),
        "act_method=2 applies to W8A8",
        "--w8a8",
    ),
    "observer without a calibrated attention scale": (
        lambda c: c.compile("--w8a8", "--observer", "mse"),
        "observer='mse' chooses the calibrated attention scales",
        "drop --observer",
    ),
    "disable level past the Linears": (
        lambda c: c.compile("--w8a8", "--disable-level", "L1000"),
        "--disable-level L1000: the model has only 14 quantizable Linears",
        "use at most L14",
    ),
    "disable level auto with one calibration window": (
        lambda c: c.compile("--w8a8", "--disable-level", "auto", "--calib-samples", "1"),
        "needs at least 2 calibration windows (one is held out), got 1",
        "raise --calib-samples",
    ),
    "tokenizer given for a PyTorch model": (
        lambda c: c.compile("--kv-int8", "--tokenizer", str(c.model)),
        "only ONNX models take a separate tokenizer",
        "carries its own",
    ),
    "format onnx for a PyTorch model": (
        lambda c: c.compile("--kv-int8", "--format", "onnx"),
        "qpass rewrites ONNX models it is given",
        "export the model to ONNX",
    ),
    "layerwise with a .gguf file": (
        lambda c: c.compile("--kv-int8", "--layerwise", model="default"),
        "is not a Hugging Face model directory",
        "reads such a directory only",
    ),
    "recipe with a calibration file": (
        lambda c: c.compile("--recipe", str(c.compiled / "recipe"), "--calib", str(c.text["calib"])),
        "--recipe reuses a calibration, so nothing would read this text",
        "drop --calib",
    ),
    "model is a dangling link": (
        lambda c: c.compile("--kv-int8", model=link(c, "gone", c.p / "nowhere")),
        "no such file or directory",
        "give a Hugging Face model directory",
    ),
    "model is a link loop": (
        lambda c: c.compile("--kv-int8", model=link(c, "a", link(c, "b", c.p / "a"))),
        "no such file or directory",
        "give a Hugging Face model directory",
    ),
    "config declares no layers": (
        lambda c: c.compile("--kv-int8", model=model_with(c, config=lambda d: edit(d, num_hidden_layers=0))),
        "num_hidden_layers 0, so there is no attention",
        "repair config.json",
    ),
    "config count of the wrong type": (
        lambda c: c.compile("--kv-int8", model=model_with(c, config=lambda d: edit(d, num_attention_heads="4"))),
        "cannot load this model's config.json (Validation error for field 'num_attention_heads'",
        "check config.json",
    ),
    "config heads that do not divide the hidden size": (
        lambda c: c.compile("--kv-int8", model=model_with(c, config=lambda d: edit(d, num_attention_heads=3))),
        "not a multiple of the number of attention heads (3)",
        "check config.json",
    ),
    "config of the wrong type, layer-wise": (
        lambda c: c.compile(
            "--kv-int8", "--layerwise", model=model_with(c, config=lambda d: edit(d, num_attention_heads="4"))
        ),
        "cannot load this model's config.json (Validation error for field 'num_attention_heads'",
        "check config.json",
    ),
    "config positions negative": (
        lambda c: c.compile("--kv-int8", model=model_with(c, config=lambda d: edit(d, max_position_embeddings=-1))),
        "-1 positions",
        "max_position_embeddings",
    ),
    "sharded weights missing a shard": (
        lambda c: c.compile("--kv-int8", model=sharded(c, drop=1)),
        "model-00002-of-00002.safetensors",
        "the safetensors weights",
    ),
    "weights of NaN": (
        lambda c: c.compile(
            "--kv-int8",
            model=model_with(
                c, weights=set_tensor("model.layers.0.self_attn.k_proj.weight", lambda t: t * float("nan"))
            ),
        ),
        "weight model.layers.0.self_attn.k_proj.weight holds NaN or infinite values",
        "re-download the model",
    ),
    "tokenizer.json truncated": (
        lambda c: c.compile("--kv-int8", model=model_with(c, truncate="tokenizer.json")),
        "cannot load the tokenizer",
        "check the tokenizer files",
    ),
    "tokenizer_config.json corrupt": (
        lambda c: c.compile("--kv-int8", model=model_with(c, add={"tokenizer_config.json": b"{"})),
        "cannot load the tokenizer",
        "check the tokenizer files",
    ),
    "calib is a dangling link": (
        lambda c: c.compile("--kv-int8", "--calib", link(c, "c.jsonl", c.p / "nowhere.jsonl")),
        "does not exist",
        "give the path of a UTF-8 text file",
    ),
    "calib is a link loop": (
        lambda c: c.compile("--kv-int8", "--calib", link(c, "a.txt", link(c, "b.txt", c.p / "a.txt"))),
        "--calib: cannot read",
        "check the path",
    ),
    "eval is the calibration file": (
        lambda c: c.compile("--kv-int8", "--eval", str(c.text["calib"])),
        "is the calibration file",
        "evaluate on text not used for calibration",
    ),
    "eval command, eval not UTF-8": (
        lambda c: ["eval", str(c.compiled), "--eval", c.file("e.txt", b"caf\xe9")],
        "not UTF-8",
        "iconv -t utf-8",
    ),
    "eval command, eval a directory": (
        lambda c: ["eval", str(c.compiled), "--eval", str(c.p)],
        "--eval: cannot read",
        "check the path",
    ),
    "eval command, batch size 0": (
        lambda c: ["eval", str(c.compiled), "--eval", str(c.text["prose"]), "--batch-size", "0"],
        "--batch-size 0",
        "at least 1",
    ),
    "eval command, float model missing": (
        lambda c: ["eval", str(c.compiled), "--eval", str(c.text["prose"]), "--float", str(c.p / "nope")],
        "no such file or directory",
        "give a Hugging Face model directory",
    ),
    "eval command, float model broken": (
        lambda c: ["eval", str(c.compiled), "--eval", str(c.text["prose"]), "--float", model_with(c, config=b"{")],
        "config.json is not valid JSON",
        "repair or re-download",
    ),
    "recipe missing": (
        lambda c: c.compile("--recipe", str(c.p / "no-recipe")),
        "needs recipe.json and recipe.safetensors",
        "give a directory written by `qpass compile`",
    ),
    "recipe is a file": (
        lambda c: c.compile("--recipe", str(c.compiled / "recipe" / "recipe.json")),
        "needs recipe.json and recipe.safetensors",
        "give a directory written by `qpass compile`",
    ),
    "eval of a missing directory": (
        lambda c: ["eval", str(c.p / "nope"), "--eval", str(c.text["prose"])],
        "not a directory written by `qpass compile -o`",
        "give one of those",
    ),
    "eval of a file": (
        lambda c: ["eval", str(c.compiled / "program.pt2"), "--eval", str(c.text["prose"])],
        "not a directory written by `qpass compile -o`",
        "give one of those",
    ),
    "eval of a corrupt program": (
        lambda c: mindie_eval(c, compiled_with(c, raw={"program.pt2": BINARY})),
        "program.pt2: cannot load this saved program",
        "recompile into a fresh directory",
    ),
    "eval with a truncated tokenizer": (
        lambda c: mindie_eval(c, compiled_with(c, truncate="tokenizer/tokenizer.json")),
        "cannot load the tokenizer",
        "recompile into a fresh directory",
    ),
    "run with a corrupt report": (
        lambda c: ["run", compiled_with(c, raw={"report.json": b"{"}), "--prompt", "Hello"],
        "no decoder.pt2",
        "for a model whose attention the paged int8 ops support",
    ),
    "vllm-ascend tensor missing": (
        lambda c: mindie_eval(c, mindie_with(c, tensors=lambda t: without(t, NORM), source=c.vllm_ascend)),
        f"lists {NORM}",
        "add the tensor or re-export",
    ),
    "vllm-ascend weights truncated": (
        lambda c: mindie_eval(c, mindie_with(c, truncate=MINDIE_WEIGHTS, source=c.vllm_ascend)),
        f"cannot read {MINDIE_WEIGHTS}",
        "re-export the directory",
    ),
    "vllm-ascend description not JSON": (
        lambda c: ["run", mindie_with(c, raw={MINDIE_DESCRIPTION: b"{"}, source=c.vllm_ascend), "--prompt", "Hi"],
        "quant_model_description.json is not valid JSON",
        "re-export the directory",
    ),
    "eval with a recipe whose JSON lists no sites": (
        lambda c: mindie_eval(
            c,
            compiled_with(
                c,
                recipe_json=json.dumps(
                    edit(
                        json.loads((c.compiled / "recipe/recipe.json").read_text()),
                        sites=[],
                    )
                ).encode(),
            ),
        ),
        "recipe.safetensors holds layers.0.fa_k.offset, of a layer recipe.json lists no site for",
        "the two files are not of one calibration: recalibrate",
    ),
    "output is the current directory, with --force": (
        lambda c: c.compile("--kv-int8", "-o", ".", "--force"),
        "the current directory",
        "choose a new directory",
    ),
    "output is an empty path": (
        lambda c: c.compile("--kv-int8", "-o", ""),
        "-o is empty",
        "give the path of a new or empty directory",
    ),
    "output holds the working directory, with --force": (
        lambda c: c.compile("--kv-int8", "-o", "..", "--force"),
        "the current directory",
        "choose a new directory",
    ),
    "output holds the recipe, with --force": (
        lambda c: c.compile("--recipe", recipe_with(c), "-o", str(c.p), "--force"),
        "holds the input",
        "choose an output path outside every input",
    ),
    "output is the evaluation file": (
        lambda c: c.compile("--kv-int8", "--eval", c.file("e.txt", "x " * 500), "-o", str(c.p / "e.txt"), "--force"),
        "is the input",
        "choose an output path outside every input",
    ),
}


def test_the_corpus_holds_at_least_50_cases():
    assert len(CASES) >= 50


def test_the_forward_watch_sees_a_compile_and_an_eval_run(compiled, tiny_model_dir, text_files, tmp_path, monkeypatch):
    """The watch the corpus relies on to say "refused before the model ran" does see the model run."""
    started = watch_forward_passes(monkeypatch)
    args = [
        "compile",
        str(tiny_model_dir),
        *SMALL,
        "--kv-int8",
        "--calib",
        str(text_files["calib"]),
        "-o",
        str(tmp_path / "o"),
    ]
    assert main(args) == 0 and started[0] == "qpass.core.compile.calibrate"
    started.clear()
    assert main(["eval", str(compiled), "--eval", str(text_files["prose"]), "--eval-windows", "1", "--no-float"]) == 0
    assert started == ["qpass.frontends.torch_export.saved_nll"]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_writes_nothing_and_changes_no_input(
    case, tiny_model_dir, text_files, compiled, mindie, vllm_ascend, tmp_path, capsys, monkeypatch
):
    make_args, problem, fix = CASES[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    c = Inputs(tiny_model_dir, text_files, inputs, tmp_path / "out", compiled, mindie, vllm_ascend)
    args = make_args(c)
    roots = (tiny_model_dir, Path(text_files["calib"]).parent, compiled, mindie, vllm_ascend, inputs)
    before = hashes(*roots)
    capsys.readouterr()
    started = watch_forward_passes(monkeypatch)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # where "-o ." and "-o .." point
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert problem in err and fix in err, err
    assert not started, f"refused after the model ran ({started[0]}): every fault here is knowable before"
    assert not c.out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "inputs"]  # no temporary directory left behind
    assert not any((tmp_path / "cwd").iterdir())
    assert hashes(*roots) == before  # every input byte for byte, and nothing added among them


def test_a_mindie_directory_asking_for_remote_code_loads_the_built_in_architecture(mindie, tmp_path, capsys):
    """Remote code (issue 12, item 6) in a weight directory, as in a model directory: a built-in model_type loads
    with one warning line, the directory untouched."""
    from qpass.exporters.mindie_load import load

    d = tmp_path / "m"
    shutil.copytree(mindie, d)
    doc = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**doc, "auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}))
    before = hashes(d)
    capsys.readouterr()
    loaded = load(d, load_tokenizer=False)
    err = capsys.readouterr().err
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and loaded.recipe is not None
    assert (
        err.count("\n") == 1
        and "loading the built-in llama architecture instead (the model's own code was not run)" in err
    )
    assert hashes(d) == before


def test_a_truncated_program_is_one_line_in_a_real_process_too(compiled, text_files, tmp_path):
    """torch.export logs each failed reader's traceback on its own logger, which pytest's capture never shows: the
    console script, in a process of its own, prints qpass's one line and nothing else."""
    d = tmp_path / "compiled"
    shutil.copytree(compiled, d)
    data = (d / "program.pt2").read_bytes()
    (d / "program.pt2").write_bytes(data[: len(data) // 2])
    args = [sys.executable, "-m", "qpass.cli", "eval", str(d), "--eval", str(text_files["prose"]), "--no-float"]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "cannot load this saved program" in done.stderr and "recompile into a fresh directory" in done.stderr


def _writable(root: Path, writable: bool) -> None:
    """Every directory and file under ``root`` (and ``root``) with write permission, or without."""
    for path in (root, *root.rglob("*")):
        mode = path.stat().st_mode
        path.chmod(mode | 0o200 if writable else mode & ~0o222)


def test_read_only_inputs_compile_and_the_output_reads_back_read_only(tiny_model_dir, text_files, tmp_path, capsys):
    """The read-only cells of the matrix: a model directory and text files without write permission (a read-only
    mount, a shared cache) compile, and `qpass eval` / `qpass run` read a read-only output; no input gains or loses a
    file or a byte. (As root the permissions bind nothing: the hashes are then the check that nothing wrote there.)"""
    model, texts, out = tmp_path / "model", tmp_path / "texts", tmp_path / "out"
    shutil.copytree(tiny_model_dir, model)
    texts.mkdir()
    for name in ("calib", "prose"):
        shutil.copy(text_files[name], texts / Path(text_files[name]).name)
    calib, prose = (str(texts / Path(text_files[name]).name) for name in ("calib", "prose"))
    _writable(model, False)
    _writable(texts, False)
    try:
        before = hashes(model, texts)
        args = ["compile", str(model), *SMALL, "--kv-int8", "--calib", calib, "--eval", prose, "-o", str(out)]
        assert main(args) == 0
        _writable(out, False)
        written = hashes(out)
        assert main(["eval", str(out), "--eval", prose, "--eval-windows", "2", "--no-float"]) == 0
        assert main(["run", str(out), "--prompt", "Hello"]) == 2  # the tiny model has no lowered decoder (head_dim 16)
        assert "no decoder.pt2" in capsys.readouterr().err
        assert hashes(model, texts) == before and hashes(out) == written
    finally:
        for root in (model, texts, out):
            if root.exists():
                _writable(root, True)


def test_an_output_parent_that_is_not_writable_is_refused_before_any_work(
    tiny_model_dir, text_files, tmp_path, capsys, monkeypatch
):
    """-o under a directory the user cannot write: one line, before the model loads, nothing made there."""
    import os

    import qpass.core.output as output

    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: stand in for the answer the kernel gives anyone else
        access = os.access
        monkeypatch.setattr(output.os, "access", lambda p, mode: False if Path(p) == parent else access(p, mode))
    started = watch_forward_passes(monkeypatch)
    args = ["compile", str(tiny_model_dir), *SMALL, "--kv-int8", "--calib", str(text_files["calib"])]
    capsys.readouterr()
    assert main([*args, "-o", str(parent / "new" / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot create it under {parent} (not a writable directory)" in err, err
    assert "choose an output path you can write" in err and not started and not any(parent.iterdir())
    parent.chmod(0o755)


def test_weights_of_nan_are_refused_layer_wise_as_their_layer_is_read(tiny_model_dir, text_files, tmp_path, capsys):
    """Layer-wise, a weight holding NaN is refused when its layer is read (checking every weight before the run would
    read a model larger than memory twice): one line, exit 2, nothing written, the input unchanged."""
    c = Inputs(tiny_model_dir, text_files, tmp_path, tmp_path / "out", None, None, None)
    nan = set_tensor("model.layers.1.mlp.down_proj.weight", lambda t: t * float("nan"))
    model = model_with(c, weights=nan)
    before = hashes(Path(model))
    capsys.readouterr()
    assert main(c.compile("--kv-int8", "--layerwise", model=model)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "weight model.layers.1.mlp.down_proj.weight holds NaN" in err, err
    assert "re-download the model" in err and not c.out.exists() and hashes(Path(model)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
