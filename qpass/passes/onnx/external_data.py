"""The one check of an ONNX model's external data, before anything reads it: the ONNX frontend's input and the ONNX
exporter's output directory alike. Every data file must lie in the model's directory (ONNX Runtime and onnx-ir read
no other: a location such as ``../w.bin``, an absolute path, or a link out of the directory is refused before any
byte of it is read), be a file of its own (onnx-ir refuses a data file with several hard links), and hold each
tensor's ``offset + length`` bytes."""

import os
from pathlib import Path

import onnx_ir as ir

from qpass.core.errors import QpassError


def check_external_data(model: ir.Model, path: Path, fix: str | None = None) -> None:
    """Refuse, in one line naming the tensor and its location, external data ``model`` (read from ``path``) cannot
    be run with; ``fix``: the way out every refusal gives (else each its own, for a model as it was exported)."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        base = Path(tensor.base_dir or path.parent)
        data = base / tensor.location
        what = f"{path}: the external data of {value.name} ({tensor.location})"
        if not _inside(os.path.abspath(data), os.path.abspath(base)):
            raise QpassError(
                f"{what} lies outside the model's directory, where ONNX Runtime reads no data; "
                f"{fix or f'put the data file beside {path.name} and export with its location a bare file name'}"
            )
        if not _inside(os.path.realpath(data), os.path.realpath(base)):
            raise QpassError(
                f"{what} links to {os.path.realpath(data)}, outside the model's directory, where ONNX Runtime reads no "
                f"data; {fix or f'put the data file itself beside {path.name}'}"
            )
        if not data.is_file() or data.stat().st_size < (tensor.offset or 0) + (tensor.length or 0):
            raise QpassError(
                f"{what} is missing or short; {fix or 'keep the data file next to the model, as it was exported'}"
            )
        if data.stat().st_nlink > 1:
            raise QpassError(
                f"{what} is a file with {data.stat().st_nlink} hard links, which onnx-ir refuses to read; "
                f"{fix or f'copy it beside {path.name} as a file of its own (cp, not ln)'}"
            )


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.normcase(os.path.normpath(path)), os.path.normcase(os.path.normpath(directory))
    return path.startswith(directory.rstrip(os.sep) + os.sep)
