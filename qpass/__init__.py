"""qpass: a quantization compiler for LLM attention (FAQuant and int8 KV cache, C8).

The names below load on first use, so ``import qpass`` stays cheap (no torch until it is needed).
"""

import importlib

_EXPORTS = {
    "CompileResult": "qpass.api",
    "compile": "qpass.api",
    "evaluate_saved": "qpass.api",
    "generate": "qpass.api",
    "inspect_model": "qpass.api",
    "long_context": "qpass.api",
    "open_model": "qpass.api",
    "QuantConfig": "qpass.core.config",
    "RunSettings": "qpass.core.config",
    "QpassError": "qpass.core.errors",
    "Recipe": "qpass.core.recipe",
    "load_model": "qpass.models.loaders",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qpass' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
