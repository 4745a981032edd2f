"""The exporters: name -> write, detect, load. The API and CLI choose one by name (``--format``) or by
detecting what a directory holds (``qpass eval`` / ``qpass run``).

An exporter writes a :class:`Compiled` (the recipe with its sites' module names, the float state
dict, the model's config and tokenizer, and what the frontend built) into a directory, and reads
such a directory back as a :class:`Loaded`, for evaluation (``purpose="eval"``) or generation (``"run"``).
"""

from pathlib import Path

from qpass.core.errors import QpassError
from qpass.exporters import NAMES
from qpass.exporters.base import Compiled, Exporter, Loaded  # noqa: F401  (the registry's types, re-exported)


def _exporters() -> dict[str, Exporter]:
    from qpass.exporters import (
        mindie_format,
        mindie_load,
        mindie_write,
        onnx_format,
        qpass_format,
        vllm_format,
    )  # they import torch: on first use

    exporters = {
        "qpass": Exporter(
            "qpass",
            qpass_format.write,
            qpass_format.detect,
            qpass_format.load,
            qpass_format.check,
            qpass_format.FILES,
            qpass_format.refusal,
            "torch.export",
        ),
        "mindie": Exporter(
            "mindie",
            mindie_write.write,
            mindie_format.detect,
            mindie_load.load,
            mindie_load.check,
            mindie_write.FILES,
            mindie_write.refusal,
            "torch.export",
        ),
        # the same directory in the form vllm-ascend reads; it loads back through the same reader
        "vllm-ascend": Exporter(
            "vllm-ascend",
            mindie_write.write_vllm_ascend,
            mindie_format.detect,
            mindie_load.load,
            mindie_load.check,
            mindie_write.FILES,
            mindie_write.refusal_vllm_ascend,
            "torch.export",
        ),
        "onnx": Exporter(
            "onnx",
            onnx_format.write,
            onnx_format.detect,
            onnx_format.load,
            onnx_format.check,
            onnx_format.FILES,
            onnx_format.refusal,
            "onnx",
        ),
        # a Hugging Face-style directory that vLLM serves (with qpass's plugin when attention is quantized)
        "vllm": Exporter(
            "vllm",
            vllm_format.write,
            vllm_format.detect,
            vllm_format.load,
            vllm_format.check,
            vllm_format.FILES,
            vllm_format.refusal,
            "torch.export",
        ),
    }
    assert tuple(exporters) == NAMES, "qpass.exporters.NAMES lists the registry's exporters"
    return exporters


def get(name: str) -> Exporter:
    exporters = _exporters()
    if name not in exporters:
        raise QpassError(f"--format {name}: choose one of {', '.join(exporters)}")
    return exporters[name]


def default_for(frontend: str) -> str:
    """The format a model read by ``frontend`` is written in unless ``--format`` says otherwise."""
    return "onnx" if frontend == "onnx" else "qpass"


def check(name: str | None, config, options: dict) -> str:
    """The exporter ``name`` (None: the default for ``options["frontend"]``), refused before any work when it cannot
    write the policy ``config`` with ``options`` (``dtype``, the input's ``frontend``): one line with the way out."""
    name = name or default_for(options["frontend"])
    why = get(name).refusal(config, options)
    if why:
        raise QpassError(why)
    return name


def detect(path: str | Path) -> Exporter:
    """The exporter whose directory ``path`` is."""
    for exporter in _exporters().values():
        if exporter.detect(Path(path)):
            return exporter
    raise QpassError(
        f"{path}: not a directory written by `qpass compile -o` (program.pt2; model.onnx with recipe/; config.json "
        "whose quantization_config is qpass's or compressed-tensors') nor a MindIE weight directory "
        "(quant_model_description.json); give one of those"
    )
