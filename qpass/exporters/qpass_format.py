"""qpass's own directory: the quantized program, the lowered decoder, the recipe, the tokenizer, the report.

    program.pt2   the quantized program (``torch.export.save``), Q/DQ around q, k, v
    decoder.pt2   the same lowered to paged int8 attention, for ``qpass run`` (when the model can be lowered)
    recipe/       recipe.safetensors + recipe.json (:mod:`qpass.core.recipe`)
    tokenizer/    the model's tokenizer

A layer-wise compile (``--layerwise``) captures no whole program: its directory holds ``recipe/``, ``tokenizer/``
and the report only, for ``qpass compile MODEL --recipe DIR/recipe`` where the model fits.
"""

import json
from pathlib import Path

import torch

from qpass.core import report as reporting
from qpass.core.errors import QpassError
from qpass.core.recipe import Recipe
from qpass.exporters.base import Compiled, Loaded, first_refusal
from qpass.models.loaders import load_tokenizer

PROGRAM_FILE = "program.pt2"
DECODER_FILE = "decoder.pt2"
RECIPE_DIR = "recipe"
TOKENIZER_DIR = "tokenizer"
FILES = "program.pt2, decoder.pt2, recipe/, tokenizer/, report.json, report.txt, report.png"  # decoder.pt2 when lowered


def refusal(config, options: dict) -> str | None:
    """What qpass's directory cannot hold with ``options`` (``dtype``, the input's ``frontend``); any policy it can."""
    return first_refusal(
        (
            (
                "--format qpass: an ONNX input is written as ONNX (its weights stay in its graph); "
                "drop --format, or compile the PyTorch model for this format",
                options.get("frontend") == "onnx",
            ),
            (
                f"--dtype {options.get('dtype')}: only --format mindie / vllm-ascend have a model dtype; drop --dtype",
                options.get("dtype"),
            ),
        )
    )


def write(compiled: Compiled, directory: Path, options: dict) -> None:
    why = refusal(compiled.recipe.config, options)
    if why:
        raise QpassError(why)
    if compiled.program is None and not compiled.report.get("model", {}).get("layerwise"):
        raise QpassError(
            "--format qpass needs the quantized program; save the CompileResult that qpass.compile returned"
        )
    if compiled.program is not None:
        torch.export.save(compiled.program, str(directory / PROGRAM_FILE))
    if compiled.decoder is not None:
        torch.export.save(compiled.decoder, str(directory / DECODER_FILE))
    compiled.recipe.save(directory / RECIPE_DIR)
    if compiled.tokenizer is not None:
        compiled.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
    reporting.write(compiled.report, directory)


def check(path: Path) -> None:
    """Re-read a directory just written: the recipe (its scales and offsets checked), every stored file of the
    saved programs against its checksum, and the tokenizer when one was written."""
    import zipfile

    Recipe.load(path / RECIPE_DIR)
    if (path / TOKENIZER_DIR).is_dir():
        load_tokenizer(
            path / TOKENIZER_DIR, f"{path / TOKENIZER_DIR}: did not read back", "check the disk and compile again"
        )
    for name in (PROGRAM_FILE, DECODER_FILE):
        if (name == PROGRAM_FILE and not recipe_only(path)) or (path / name).exists():
            try:
                with zipfile.ZipFile(path / name) as archive:
                    bad = archive.testzip()
            except (zipfile.BadZipFile, OSError) as err:
                bad = str(err)
            if bad is not None:
                raise QpassError(f"{path / name}: did not read back whole ({bad}); check the disk and compile again")


def detect(path: Path) -> bool:
    return (Path(path) / PROGRAM_FILE).is_file() or recipe_only(Path(path))


def recipe_only(path: Path) -> bool:
    """Whether ``path`` is what a layer-wise compile writes: no program, a recipe, a report saying ``layerwise``."""
    if (path / PROGRAM_FILE).exists() or not (path / RECIPE_DIR).is_dir() or not (path / "report.json").is_file():
        return False
    try:
        return json.loads((path / "report.json").read_text(encoding="utf-8")).get("model", {}).get("layerwise") is True
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def load(path: Path, purpose: str = "eval") -> Loaded:
    """The program (``purpose="eval"``) or the lowered decoder (``"run"``), with the recipe and tokenizer."""
    path = Path(path)
    if recipe_only(path):
        raise QpassError(
            f"{path}: a layer-wise compile's directory holds the recipe only (no {PROGRAM_FILE}); run "
            f"`qpass compile MODEL --recipe {path / RECIPE_DIR} -o OUT` where the model fits, and use OUT"
        )
    recipe = Recipe.load(path / RECIPE_DIR)
    if not (path / TOKENIZER_DIR).is_dir():
        raise QpassError(
            f"{path}: no {TOKENIZER_DIR}/; recompile into a fresh directory (it writes the model's tokenizer there)"
        )
    tokenizer = load_tokenizer(path / TOKENIZER_DIR, f"{path}: {TOKENIZER_DIR}/", "recompile into a fresh directory")
    if purpose == "eval":
        return Loaded("qpass", tokenizer, recipe, program=_load_program(path / PROGRAM_FILE))
    decoder = path / DECODER_FILE
    if not decoder.is_file():
        skipped = reporting.read(path).get("decoder", {}).get("skipped")  # {} for a report that is gone or broken
        reason = f" (compile skipped it: {skipped})" if skipped else ""
        raise QpassError(
            f"{path}: no {DECODER_FILE}{reason}; give a directory written by `qpass compile -o` "
            "for a model whose attention the paged int8 ops support"
        )
    return Loaded("qpass", tokenizer, recipe, decoder=_load_program(decoder))


def _load_program(path: Path):
    """``torch.export.load`` of a saved program, refusing a truncated or corrupt file in one line."""
    import logging
    import zipfile

    log = logging.getLogger("torch.export")  # logs each failed reader's traceback before trying the next one
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return torch.export.load(str(path))
    except (zipfile.BadZipFile, OSError, RuntimeError, ValueError, KeyError, EOFError) as err:
        raise QpassError(
            f"{path}: cannot load this saved program "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "it is truncated or corrupt: recompile into a fresh directory"
        ) from err
    finally:
        log.setLevel(level)
