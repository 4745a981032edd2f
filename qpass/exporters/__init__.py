"""Exporters behind one registry: name -> write, detect, load (see :mod:`qpass.exporters.registry`).

They read the core's recipe, the sites' module names and a state dict; they import neither the API
nor a frontend.
"""

NAMES = (
    "qpass",
    "mindie",
    "vllm-ascend",
    "onnx",
    "vllm",
)  # the registry's exporters, here so that the CLI's parser needs no torch
