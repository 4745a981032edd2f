"""The ONNX directory: the quantized decoder as ONNX Runtime and onnxruntime-genai load it.

model.onnx          the rewritten graph (int8 ``past_key_values.*`` / ``present.*`` with C8)
model.onnx.data     its weights, when the input kept them outside (onnxruntime-genai's builder does) or they are large
genai_config.json   where the input had one, updated for the int8 cache
tokenizer files     next to the model, where onnxruntime-genai and ``qpass compile`` look for them
recipe/             recipe.safetensors + recipe.json (:mod:`qpass.core.recipe`)
report.json, report.txt, report.png
"""

import json
from pathlib import Path

import onnx_ir as ir

from qpass.core import report as reporting
from qpass.core.errors import QpassError
from qpass.core.recipe import Recipe
from qpass.exporters.base import Compiled, Loaded, first_refusal
from qpass.models.loaders import load_tokenizer
from qpass.ort.stages import run_stages, split
from qpass.passes.onnx.base import SITES_METADATA
from qpass.passes.onnx.external_data import check_external_data

MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx.data"
RECIPE_DIR = "recipe"
EXTERNAL_BYTES = 1 << 30  # weights above this go to model.onnx.data (protobuf caps a file at 2 GiB)
FILES = "model.onnx, recipe/, tokenizer files, report.json, report.txt, report.png"


def refusal(config, options: dict) -> str | None:
    """What an ONNX output cannot carry under ``config`` with ``options`` (``dtype``, the input's ``frontend``)."""
    return first_refusal(
        (
            (
                "--format onnx: qpass rewrites ONNX models it is given; export the model to ONNX "
                "(torch.onnx.export or onnxruntime-genai's builder) and compile that",
                options.get("frontend") not in (None, "onnx"),
            ),
            (
                f"--dtype {options.get('dtype')}: an ONNX model keeps its own dtype; drop --dtype",
                options.get("dtype"),
            ),
            (
                "--kv-int8 dynamic: qpass writes no per-token int8 cache form in ONNX; "
                "use --kv-int8 (static, per channel)",
                config.kv_cache == "dynamic",
            ),
        )
    )


def write(compiled: Compiled, directory: Path, options: dict) -> None:
    why = refusal(compiled.recipe.config, options)
    if why:
        raise QpassError(why)
    model = compiled.program
    if not isinstance(model, ir.Model):
        raise QpassError(
            "--format onnx needs an ONNX input model (a .onnx file or a directory holding model.onnx); "
            "compile the ONNX export of this model"
        )
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    external = compiled.report.get("model", {}).get("external_data") or weights > EXTERNAL_BYTES
    ir.save(model, directory / MODEL_FILE, external_data=DATA_FILE if external else None)
    for name, text in compiled.files.items():
        (directory / name).write_text(text, encoding="utf-8")
    if compiled.tokenizer is not None:
        compiled.tokenizer.save_pretrained(str(directory))
    compiled.recipe.save(directory / RECIPE_DIR)
    reporting.write(compiled.report, directory)


def check(path: Path) -> None:
    """Re-read a directory just written: the recipe (its scales checked), the model through ``onnx.checker``
    (with ``full_check`` where the input passed it) and an ONNX Runtime session (one per stage, one at a time, after a
    layer-wise compile), and the JSON files."""
    import onnxruntime as ort

    Recipe.load(path / RECIPE_DIR)
    report = json.loads((path / "report.json").read_text(encoding="utf-8"))
    try:
        if report.get("model", {}).get("checker_full"):
            import onnx

            onnx.checker.check_model(str(path / MODEL_FILE), full_check=True)
        if report.get("calibration", {}).get("layerwise"):  # a model larger than memory: one layer's session at a time
            _load_layerwise(path / MODEL_FILE)
        else:
            ort.InferenceSession(str(path / MODEL_FILE), providers=["CPUExecutionProvider"])
    except QpassError:
        raise
    except Exception as err:  # onnx's ValidationError, onnxruntime's Fail / InvalidGraph
        raise QpassError(
            f"{path / MODEL_FILE}: did not read back as a valid model ({str(err).splitlines()[0][:200]}); "
            "check the disk and compile again"
        ) from None
    for name in path.glob("*.json"):
        json.loads(name.read_text(encoding="utf-8"))


def _load_layerwise(path: Path) -> None:
    """ONNX Runtime loads every stage of the model at ``path`` (:mod:`qpass.ort.stages`), one at a time."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    sites = json.loads(next((p.value for p in proto.metadata_props if p.key == SITES_METADATA), "[]"))
    attention = [site.get("attention") for site in sites]
    if not sites or None in attention:
        raise QpassError(f"{path}: its {SITES_METADATA} metadata does not name each site's attention; compile again")
    stages = split(proto.graph, attention)
    for _ in run_stages(
        proto, stages, path.parent, lambda index, stage: stage.outputs, lambda index, session, outputs: None
    ):
        pass


def detect(path: Path) -> bool:
    return (Path(path) / MODEL_FILE).is_file() and (Path(path) / RECIPE_DIR).is_dir()


def load(path: Path, purpose: str = "eval") -> Loaded:
    """The quantized model (onnx-ir, weights read lazily, their external data checked first) with its recipe and
    tokenizer, for evaluation or decoding."""
    path = Path(path)
    recipe = Recipe.load(path / RECIPE_DIR)
    tokenizer = load_tokenizer(path, str(path), "recompile into a fresh directory")
    try:
        model = ir.load(path / MODEL_FILE)
    except Exception as err:  # protobuf's DecodeError, OSError
        raise QpassError(
            f"{path / MODEL_FILE}: not a readable ONNX model ({type(err).__name__}); it is truncated or "
            "corrupt: recompile into a fresh directory"
        ) from None
    check_external_data(model, path / MODEL_FILE, "recompile into a fresh directory")  # as compile checks its input
    ids = next((v for v in model.graph.inputs if v.name == "input_ids"), None)
    length = ids.shape[1] if ids is not None and ids.shape is not None and len(ids.shape) == 2 else None
    if purpose == "run" and isinstance(length, int):  # ONNX Runtime would refuse the first one-token step
        raise QpassError(
            f"{path / MODEL_FILE}: takes exactly {length} tokens a run (input_ids' sequence axis is fixed), and "
            "qpass run feeds one token a step after the prompt; `qpass eval` reads it, or export the model with a "
            "dynamic sequence axis to generate"
        )
    return Loaded("onnx", tokenizer, recipe, program=model, info={"model_file": str(path / MODEL_FILE)})
