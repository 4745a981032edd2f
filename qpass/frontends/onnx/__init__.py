"""The ONNX frontend: ONNX decoders loaded with onnx-ir, rewritten by its passes, run in ONNX Runtime, whole or one
attention site's stage at a time (:mod:`.layerwise`).

Its registry entry points (see :mod:`qpass.frontends`); the modules load on first use.
"""

DEFAULT_WINDOW = 512  # the evaluation window of an ONNX directory whose recipe records none


def accepts(model) -> bool:
    """A ``.onnx`` file, or a directory holding ``model.onnx``."""
    from qpass.frontends.onnx.load import is_onnx

    return is_onnx(model)


def open(model, window: int, tokenizer=None, layerwise: bool = False):
    """The ONNX decoder ``model`` over ``[batch, window]`` token ids, run whole or one layer's stage at a time."""
    from qpass.frontends.onnx.frontend import OnnxFrontend

    return OnnxFrontend.load(model, window, tokenizer, layerwise)


def whole_model_memory(model) -> int | None:
    from qpass.frontends.onnx.load import whole_model_memory as need

    return need(model)


def saved_window(loaded) -> int:
    """The window the recipe was calibrated over (the graph's sequence axis is dynamic), else :data:`DEFAULT_WINDOW`."""
    from qpass.core.recipe import CALIBRATED_WITH

    return int(loaded.recipe.stats.get(CALIBRATED_WITH, {}).get("window", DEFAULT_WINDOW))


def saved_nll(loaded, directory, windows, batch_size: int, desc: str, counters: dict):
    """``(per-window NLL [N], layerwise)`` of a directory read back, run whole in ONNX Runtime, or one stage at a time
    when the whole graph would not fit in the memory available."""
    from pathlib import Path

    from qpass.core.evaluate import window_nll
    from qpass.core.memory import available_memory
    from qpass.frontends.onnx.frontend import OnnxFrontend
    from qpass.frontends.onnx.load import MODEL_FILE

    need = whole_model_memory(Path(directory) / MODEL_FILE)
    if need is not None and need > available_memory():
        return OnnxFrontend.layerwise_nll(loaded.program, Path(directory), windows, batch_size, desc, counters), True
    return window_nll(OnnxFrontend.counting_logits(loaded.program, counters), windows, batch_size, desc), False


def generate(loaded, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None) -> list[int]:
    """Greedy decoding in ONNX Runtime, the int8 ``present.*`` fed back as ``past_key_values.*``."""
    from qpass.frontends.onnx.frontend import OnnxFrontend

    return OnnxFrontend.generate(loaded.program, prompt_ids, max_new_tokens, eos_token_id)


def long_context_scorers(loaded, float_model, context: int):
    """Refused: the long-context check runs the quantized model through a cache, and this frontend has no scorer that
    feeds ONNX Runtime's ``present.*`` back chunk by chunk yet (it does so for greedy decoding only)."""
    from qpass.core.errors import QpassError

    raise QpassError(
        "--context: the long-context check does not run ONNX directories yet (it needs ONNX Runtime's int8 cache "
        "fed back chunk by chunk and scored, which qpass does only for greedy decoding); check the qpass or MindIE "
        "directory compiled from the PyTorch model instead"
    )
