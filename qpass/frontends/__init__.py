"""Frontends: each loads models in one IR, finds their sites and runs its own pass pipeline (the
:class:`qpass.core.frontend.Frontend` protocol), whole or one decoder layer at a time (its modes). Frontends do not
import each other.

The registry, by name (``"onnx"``, ``"torch.export"``): which frontend reads a model (:func:`name_of`), and each
frontend package's entry points, imported on first use. Each package offers the same functions:

- ``accepts(model) -> bool``: whether it reads ``model`` (the first that does reads it);
- ``open(model, window, tokenizer, layerwise) -> Frontend``: the model opened in the mode asked for;
- ``whole_model_memory(model) -> int | None``: bytes a whole-model run needs, about (None: unknown);
- ``saved_window(loaded) -> int``: the window a directory read back runs over;
- ``saved_nll(loaded, directory, windows, batch_size, desc, counters) -> (per-window NLL [N], layerwise)``;
- ``generate(loaded, prompt_ids, max_new_tokens, eos_token_id) -> new ids``;
- ``long_context_scorers(loaded, float_model, context) -> (float_score, quant_score, info)``: the long-context
  check's two runs (:mod:`qpass.core.longcontext`), or a one-line refusal.
"""

import importlib

PACKAGES = {"onnx": "qpass.frontends.onnx", "torch.export": "qpass.frontends.torch_export"}  # asked in this order


def get(name: str):
    """The entry points of frontend ``name``."""
    return importlib.import_module(PACKAGES[name])


def name_of(model) -> str:
    """The frontend that reads ``model``: ONNX for a ``.onnx`` file or a directory holding ``model.onnx``,
    torch.export for the rest (a Hugging Face directory, a ``.gguf`` file, ``default``, a loaded model)."""
    return next(name for name in PACKAGES if get(name).accepts(model))
