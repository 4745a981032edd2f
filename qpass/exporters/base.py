"""What flows between a compile and an exporter: :class:`Compiled` in (the core's), :class:`Loaded` back, and the
:class:`Exporter` entry that names a format's functions and its rules."""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qpass.core.compile import Compiled
from qpass.core.config import QuantConfig
from qpass.core.recipe import Recipe


@dataclass
class Loaded:
    """A directory read back: a program to run as it is, or a model to run with ``recipe``'s attention quantization."""

    format: str
    tokenizer: object
    recipe: Recipe | None
    program: object = None  # runs as it is (qpass: program.pt2)
    decoder: object = None  # lowered for paged decoding (qpass: decoder.pt2)
    model: torch.nn.Module | None = None  # a model whose attention the frontend quantizes with ``recipe``
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Exporter:
    name: str
    write: Callable[[Compiled, Path, dict], None]  # (compiled, directory, options such as dtype)
    detect: Callable[[Path], bool]
    load: Callable[[Path, str], Loaded]  # (directory, purpose: "eval" or "run")
    check: Callable[[Path], None]  # re-read a freshly written directory; raises QpassError when it is not whole
    files: str  # what it writes, for the CLI's last line
    # what it cannot write, in one line with the way out, or None: (policy, {"dtype": ..., "frontend": ...})
    refusal: Callable[[QuantConfig, dict], str | None]
    frontend: str  # the frontend that runs what it reads back ("torch.export" or "onnx")


def first_refusal(rules) -> str | None:
    """The message of the first ``(message, broken)`` rule that is broken, or None: how a format lists its refusals."""
    return next((why for why, broken in rules if broken), None)


__all__ = ["Compiled", "Exporter", "Loaded", "first_refusal"]
