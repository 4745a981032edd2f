"""qpass: a quantization compiler for LLM attention (FAQuant and int8 KV cache, C8)."""

from qpass.api import CompileResult, compile, evaluate_saved, inspect_model
from qpass.config import QuantConfig
from qpass.errors import QpassError
from qpass.models.loaders import load_model
from qpass.recipe import Recipe

__all__ = ["CompileResult", "QpassError", "QuantConfig", "Recipe", "compile", "evaluate_saved", "inspect_model", "load_model"]
__version__ = "0.1.0"
