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
    """``(float_score, quant_score, info)`` for the long-context check (:func:`qpass.core.longcontext.measure`): the
    quantized model and ``float_model`` (the ONNX model it was compiled from) in ONNX Runtime, each on its own cache
    fed back chunk by chunk, then token by token; refused in one line where ``context`` is beyond the positions the
    model's ``genai_config.json`` or ``config.json`` gives, or the model takes a fixed number of tokens a run."""
    from qpass.core.errors import QpassError
    from qpass.core.longcontext import check_context
    from qpass.frontends.onnx import longcontext
    from qpass.frontends.onnx.frontend import OnnxFrontend
    from qpass.frontends.onnx.pipeline import read_sites
    from qpass.frontends.onnx.session import Runner, session

    if not accepts(float_model):
        raise QpassError(
            f"--float {float_model}: an ONNX directory's float side is the ONNX model it was compiled from; give that"
        )
    reference = OnnxFrontend.load(float_model, context)
    limit = (reference.genai_config or {}).get("model", {}).get("context_length")
    check_context(context, limit or reference.config_json().get("max_position_embeddings"))
    quantized = Runner(session(loaded.program), read_sites(loaded.program))
    if not quantized.pasts:
        raise QpassError(
            "--context: this ONNX model has no past_key_values inputs, so it has no cache to run through; export the "
            "decoder with its KV cache as inputs and outputs"
        )
    float_runner = Runner(session(reference.path), reference.site_docs)
    dtypes = sorted({kind for name, (kind, _) in quantized.feeds.inputs.items() if name in quantized.pasts})
    info = {"path": f"ONNX Runtime, its cache fed back ({'/'.join(dtypes)} past_key_values)", "float": str(float_model)}
    return (
        lambda ids, desc: longcontext.scores(float_runner, ids, len(ids) - 1, desc),
        lambda ids, prefill, desc: longcontext.scores(quantized, ids, prefill, desc),
        info,
    )
