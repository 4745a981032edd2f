"""What flows between a compile and an exporter: :class:`Compiled` in, :class:`Loaded` back, and the
:class:`Exporter` entry that names the three functions of a format."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from qpass.core.recipe import Recipe


@dataclass
class Compiled:
    """What a compile hands an exporter."""

    recipe: Recipe
    report: dict
    state_dict: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)  # float, module paths, unsmoothed
    config_json: dict = field(repr=False, default_factory=dict)  # the model's config.json, architectures set
    tokenizer: object = field(repr=False, default=None)
    program: object = field(repr=False, default=None)  # the frontend's quantized program, when it has one
    decoder: object = field(repr=False, default=None)  # the same lowered to paged int8 attention
    files: dict[str, str] = field(repr=False, default_factory=dict)  # text files the frontend carries over (genai_config.json)
    by_layer: bool = False  # state_dict reads each tensor when looked up (a layer-wise compile): write layer by layer


@dataclass
class Loaded:
    """A directory read back: a program to run as it is, or a model to run with ``recipe``'s attention quantization."""

    format: str
    tokenizer: object
    recipe: Recipe | None
    program: object = None   # runs as it is (qpass: program.pt2)
    decoder: object = None   # lowered for paged decoding (qpass: decoder.pt2)
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
