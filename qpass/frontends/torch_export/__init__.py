"""The torch.export frontend: Hugging Face causal LMs captured as ``ExportedProgram``s and rewritten by torch.fx
passes, whole (:mod:`.frontend`) or one decoder layer at a time from safetensors (:mod:`.layerwise`).

Its registry entry points (see :mod:`qpass.frontends`); the modules load on first use.
"""

DEFAULT_WINDOW = 512  # the evaluation window of a weight directory that records none (MindIE), at most


def accepts(model) -> bool:
    """Every model no frontend before it reads: a Hugging Face directory, a ``.gguf`` file, ``default``, a loaded
    one."""
    return True


def open(model, window: int, tokenizer=None, layerwise: bool = False):
    """``model`` captured whole over ``[batch, window]`` token ids, or (``layerwise``) a Hugging Face directory read
    one decoder layer at a time."""
    from qpass.core.errors import QpassError
    from qpass.models.loaders import LoadedModel

    if tokenizer is not None:
        raise QpassError(
            "--tokenizer: only ONNX models take a separate tokenizer; a Hugging Face directory or .gguf carries its own"
        )
    if not layerwise:
        from qpass.frontends.torch_export.frontend import TorchExportFrontend

        return TorchExportFrontend.load(model, window)
    if isinstance(model, LoadedModel):
        raise QpassError("--layerwise: it reads a Hugging Face model directory (config.json + *.safetensors); give one")
    from qpass.frontends.torch_export.layerwise import LayerwiseFrontend

    return LayerwiseFrontend.load(model, window)


def whole_model_memory(model) -> int | None:
    """Bytes a whole-model compile of ``model`` needs, about; None for anything but a Hugging Face directory."""
    from qpass.models.loaders import LoadedModel

    if isinstance(model, LoadedModel):
        return None
    from qpass.frontends.torch_export.layerwise import whole_model_memory as need

    return need(model)


def saved_window(loaded) -> int:
    """The window a directory read back runs over: its program's (captured over one), else the model's positions or
    :data:`DEFAULT_WINDOW`, whichever is fewer."""
    if loaded.program is not None:
        ids = next(
            n
            for n in loaded.program.graph.nodes
            if n.op == "placeholder" and n.name in loaded.program.graph_signature.user_inputs
        )
        return int(ids.meta["val"].shape[1])
    positions = getattr(loaded.model.config, "max_position_embeddings", None)
    return min(DEFAULT_WINDOW, positions or DEFAULT_WINDOW)


def saved_nll(loaded, directory, windows, batch_size: int, desc: str, counters: dict):
    """``(per-window NLL [N], False)`` of a directory read back: its program as it is, or its model with the recipe's
    attention quantization applied by this frontend, feeding the saturation ``counters``."""
    from qpass.core.evaluate import window_nll
    from qpass.core.recipe import geometry
    from qpass.frontends.torch_export.frontend import TorchExportFrontend
    from qpass.models.loaders import LoadedModel

    if loaded.program is not None:
        return window_nll(
            TorchExportFrontend.counting_logits(loaded.program, counters), windows, batch_size, desc
        ), False
    frontend = TorchExportFrontend(
        LoadedModel(loaded.model, loaded.tokenizer, "directory", "directory"), windows.shape[1]
    )
    if loaded.recipe is None:
        return frontend.window_nll(None, windows, batch_size, desc), False
    loaded.recipe.check_matches(geometry(frontend.attention_sites()))
    return frontend.window_nll(loaded.recipe, windows, batch_size, desc, counters), False


def generate(loaded, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None) -> list[int]:
    """Greedy decoding of a directory read back: its lowered decoder on the paged int8 cache, or its model lowered
    with its recipe, or (W8A8 alone: the cache stays float) the model with its own cache."""
    from qpass.frontends.torch_export.decoder import build_decoder, generate_lowered, generate_with_model

    if loaded.decoder is not None:
        return generate_lowered(loaded.decoder, prompt_ids, max_new_tokens, eos_token_id=eos_token_id)
    if loaded.recipe is not None:
        _, lowered = build_decoder(loaded.model, loaded.recipe)
        return generate_lowered(lowered, prompt_ids, max_new_tokens, eos_token_id=eos_token_id)
    return generate_with_model(loaded.model, prompt_ids, max_new_tokens, eos_token_id)


def long_context_scorers(loaded, float_model, context: int):
    """``(float_score, quant_score, info)`` for the long-context check (:func:`qpass.core.longcontext.measure`):
    ``float_model`` (a model spec) scored dense on its own cache, the directory's quantized decoder through its paged
    int8 cache (prefill, then token by token); refused in one line where ``context`` is beyond the model's
    positions or the directory has no int8 cache."""
    from qpass.core.longcontext import check_context
    from qpass.frontends.torch_export import longcontext
    from qpass.frontends.torch_export.decoder import decoder_layout
    from qpass.models.loaders import load_model

    model = load_model(str(float_model)).model
    check_context(context, longcontext.max_positions(model))
    program, how = longcontext.paged_decoder(loaded, context, model)
    kind = decoder_layout(program)["kv_cache"]
    info = {"path": f"the paged int8 ops ({how}, {kind} cache)", "float": str(float_model)}
    return (
        lambda ids, desc: longcontext.float_scores(model, ids, desc),
        lambda ids, prefill, desc: longcontext.paged_scores(program, ids, prefill, desc),
        info,
    )
