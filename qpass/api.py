"""The Python API: ``qpass.compile``, ``qpass.evaluate_saved``, ``qpass.generate``, ``qpass.inspect_model``,
``qpass.open_model``.

It only chooses: a frontend for the model and its mode (the registry in :mod:`qpass.frontends`: ONNX for a ``.onnx``
file or a directory holding ``model.onnx``, torch.export otherwise; whole, or layer-wise when asked or when the
whole model would not fit in memory), and an exporter for the output (``--format``, or the one whose directory
``evaluate_saved`` is given). The work is theirs and the core's (:mod:`qpass.core.compile`, the one compile road).
"""

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from qpass import frontends
from qpass.core import longcontext, memory, saturation
from qpass.core import report as reporting
from qpass.core.compile import Compiled, Texts, compile_model
from qpass.core.config import MAX_COUNT, QuantConfig, RunSettings
from qpass.core.data import check_texts_apart, read_samples, read_text, token_windows
from qpass.core.errors import QpassError
from qpass.core.output import atomic_output_dir
from qpass.core.recipe import CALIBRATED_WITH, Recipe
from qpass.core.sites import AttentionSite
from qpass.exporters import registry
from qpass.models.loaders import LoadedModel


@dataclass
class CompileResult:
    """What ``compile`` returns: the quantized program, its recipe, the sites and the report."""

    program: object  # the frontend's quantized program (None for a layer-wise torch.export compile: the recipe only)
    recipe: Recipe
    sites: list[AttentionSite]
    report: dict
    tokenizer: object = field(repr=False, default=None)
    decoder: object = field(repr=False, default=None)  # lowered to paged int8 ops, for `qpass run`
    compiled: Compiled | None = field(repr=False, default=None)  # what exporters write

    def save(
        self, out_dir: str | Path, force: bool = False, format: str | None = None, dtype: str | None = None
    ) -> Path:
        """Write ``out_dir`` all or nothing with the exporter ``format`` (``qpass``, ``mindie``, ``vllm-ascend``,
        ``onnx``; by default ``onnx`` for an ONNX input, else ``qpass``); ``dtype`` is the model dtype of formats
        that store one (``mindie``: float16, the default, or bfloat16)."""
        options = {"dtype": dtype, "frontend": self.report.get("model", {}).get("frontend", "torch.export")}
        name = registry.check(format, self.recipe.config, options)
        with atomic_output_dir(out_dir, force, self.compiled.inputs) as tmp:
            registry.get(name).write(self.compiled, tmp, options)
            registry.get(name).check(tmp)  # read back before it is moved into place
        return Path(out_dir)


def output_format(model, format: str | None, config: QuantConfig, dtype: str | None = None) -> str:
    """The exporter that writes what ``model`` compiles to: ``format``, or the default for its frontend; refused
    here, before any work, when that exporter cannot write ``config`` (its own rules, :func:`registry.check`)."""
    return registry.check(format, config, {"dtype": dtype, "frontend": frontends.name_of(model)})


def open_model(
    model: str | Path | LoadedModel,
    window: int = RunSettings.window,
    tokenizer: str | Path | None = None,
    layerwise: bool | None = False,
):
    """``model`` opened by the frontend that reads it (a :class:`qpass.core.frontend.Frontend`), over token ids
    ``[batch, window]``; ``layerwise`` True runs it one decoder layer at a time, None does so when the whole model
    would not fit in memory (with a one-line note), False never. ``tokenizer``: an ONNX model's tokenizer directory
    (by default the tokenizer files next to it)."""
    if layerwise is None:
        layerwise = too_big(model)
    return frontends.get(frontends.name_of(model)).open(model, window, tokenizer, layerwise)


def compile(
    model: str | LoadedModel,
    config: QuantConfig,
    calib: str | Path | list[str] | None = None,
    eval: str | Path | None = None,
    recipe: str | Path | Recipe | None = None,
    run: RunSettings | None = None,
    verify: bool = True,
    tokenizer: str | Path | None = None,
    layerwise: bool | None = None,
) -> CompileResult:
    """Capture ``model``, calibrate (or reuse ``recipe``), insert Q/DQ and, given ``eval``, measure perplexity.

    ``model``: ``"default"``, a ``.gguf`` file, a Hugging Face directory, a :class:`LoadedModel`, or an ONNX
    decoder (a ``.onnx`` file or a directory holding ``model.onnx``; ``tokenizer`` names its tokenizer directory
    when the files are not next to it).
    ``config``: the policy; with ``recipe``, the recipe's own (``config`` is then not read).
    ``calib``: a ``.jsonl``/text file or a list of texts; None uses the built-in standard-library corpus.
    ``eval``: a text file, or None to skip evaluation; then the last 1/8 of the calibration windows (at least one)
    are held out of the range fitting to measure saturation on (:mod:`qpass.core.saturation`).
    ``run``: window, batch size, calibration and evaluation windows (:class:`RunSettings`; its defaults when None).
    ``layerwise``: True runs the model one decoder layer at a time (a Hugging Face directory read from its
    safetensors, an ONNX model in ONNX Runtime one layer's stage at a time); None does so when the whole model would
    not fit in memory, with a one-line note; False never.
    Warnings (calibration text too small or too repetitive, saturation far above calibration's) go to stderr, one
    line each, and into ``report["warnings"]``.
    """
    run = run or RunSettings()
    recipe_path = recipe if isinstance(recipe, (str, Path)) else None
    # the text files and the recipe first, so that a bad one is refused before the model loads
    if isinstance(recipe, (str, Path)):
        recipe = Recipe.load(Path(recipe))
    if recipe is not None:
        config = recipe.config
    check_texts_apart(calib, eval, recipe is not None)
    if recipe is not None and run.calib_samples != RunSettings().calib_samples:
        raise QpassError(
            f"--calib-samples {run.calib_samples}: --recipe reuses a calibration, so no calibration windows are read; "
            "drop --calib-samples, or drop --recipe to calibrate"
        )
    eval_text = None if eval is None else read_text(eval, "--eval")
    calib_texts = calib if calib is None or isinstance(calib, list) or recipe is not None else read_samples(calib)
    calib_name = "stdlib corpus" if calib is None else "texts" if isinstance(calib, list) else str(calib)
    texts = Texts(calib_texts, calib_name, eval_text, None if eval is None else str(eval))
    start = time.perf_counter()
    frontend = open_model(model, run.window, tokenizer, layerwise)
    frontend.check_config(config)
    timings = {"load": time.perf_counter() - start}
    compiled = compile_model(frontend, config, run, texts, recipe, verify, timings)
    compiled.inputs = tuple(str(p) for p in (model, calib, eval, recipe_path, tokenizer) if isinstance(p, (str, Path)))
    return CompileResult(
        compiled.program,
        compiled.recipe,
        compiled.sites,
        compiled.report,
        compiled.tokenizer,
        compiled.decoder,
        compiled,
    )


def too_big(model) -> bool:
    """Whether a whole-model run of ``model`` (a Hugging Face directory, or an ONNX model run whole in ONNX Runtime)
    would not fit in the memory available; a note says so."""
    name = frontends.name_of(model)
    need = frontends.get(name).whole_model_memory(model)
    available = memory.available_memory()
    if need is None or need <= available:
        return False
    how = "running it in ONNX Runtime" if name == "onnx" else "calibrating"
    print(
        f"qpass: MODEL {model}: a whole-model compile needs about {need / 2**30:.1f} GiB and "
        f"{available / 2**30:.1f} GiB is available; {how} one decoder layer at a time (--layerwise)",
        file=sys.stderr,
    )
    return True


def evaluate_saved(
    out_dir: str | Path,
    eval: str | Path,
    eval_windows: int = RunSettings.eval_windows,
    batch_size: int = RunSettings.batch_size,
    float_model: str | Path | bool | None = None,
) -> dict:
    """Reload a directory some exporter wrote (qpass's, MindIE's, ONNX) and measure its quantized perplexity on
    at most ``eval_windows`` windows of ``eval``, over the window it was compiled for, beside the float model's:
    ``float_model`` (by default the model the directory's ``report.json`` says it was compiled from, where that is
    still there; False: none)."""
    try:
        run = RunSettings(eval_windows=eval_windows, batch_size=batch_size)
    except ValueError as err:
        raise QpassError(str(err)) from None
    text = read_text(eval, "--eval")  # before the directory loads
    start = time.perf_counter()
    exporter = registry.detect(out_dir)
    loaded = exporter.load(Path(out_dir), "eval")
    frontend = frontends.get(exporter.frontend)
    counted = saturation.counters(loaded.recipe) if loaded.recipe is not None else {}
    window = frontend.saved_window(loaded)
    ids = token_windows(
        loaded.tokenizer,
        [text],
        window,
        run.eval_windows,
        "--eval",
        "give more text (the directory runs over the window it was compiled for)",
    )
    opened_float = _open_float(out_dir, float_model, window)  # a bad --float refused before the quantized run
    loaded_s = time.perf_counter() - start
    start = time.perf_counter()
    nll, layerwise = frontend.saved_nll(loaded, out_dir, ids, run.batch_size, "eval quantized", counted)
    timings = {"load": round(loaded_s, 3), "eval": round(time.perf_counter() - start, 3)}
    result = {
        "file": str(eval),
        **loaded.info,
        "tokens": int(ids.numel()),
        "windows": int(ids.shape[0]),
        "window": window,
        "ppl_quant": math.exp(float(nll.mean())),
        "timings_s": timings if loaded.program is None else {"eval": timings["eval"]},
    }
    if layerwise:
        result["layerwise"] = True
    result["float"] = _float_perplexity(opened_float, ids, run.batch_size)
    if "ppl" in result["float"]:
        result["ppl_increase_pct"] = (result["ppl_quant"] / result["float"]["ppl"] - 1.0) * 100.0
    if counted:
        result["saturation"] = saturation.section(loaded.recipe, counted, "eval", ids)
        warning = saturation.warning(result["saturation"])
        result["warnings"] = [] if warning is None else [warning]
        if warning is not None:
            print(f"qpass: {warning}", file=sys.stderr)
    return result


def _open_float(out_dir: str | Path, model: str | Path | bool | None, window: int):
    """The float model to measure beside the quantized one, opened over ``window``: ``(name, frontend)``, or
    ``{"skipped": why}`` where there is none. A ``model`` given by name that does not open is refused (before any
    run); the one ``report.json`` names is skipped."""
    if model is False:
        return {"skipped": "not asked for"}
    named = model is not None
    if not named:
        model = reporting.read(Path(out_dir)).get("model", {}).get("source")
        if not model or (model != "default" and not Path(model).exists()):
            return {"skipped": f"the model it was compiled from ({model or 'not recorded'}) is not here; give --float"}
    try:
        return str(model), open_model(str(model), window, layerwise=None)
    except QpassError as err:  # the one the report names: the quantized figures stand without it
        if named:
            raise
        return {"skipped": f"{model} does not open ({err}); give --float"}


def _float_perplexity(opened, ids, batch_size: int) -> dict:
    """``{"model": ..., "ppl": ...}``: the float model's perplexity on ``ids`` as its own framework computes it, or
    ``{"skipped": why}`` where there is no float model to run (``opened``: what :func:`_open_float` gave)."""
    if isinstance(opened, dict):
        return opened
    model, frontend = opened
    ppl = frontend.reference_perplexity(ids, batch_size)  # None layer-wise: then the float program, layer by layer
    if ppl is None:
        ppl = math.exp(float(frontend.window_nll(None, ids, batch_size, "eval float").mean()))
    return {"model": model, "ppl": ppl}


def long_context(
    out_dir: str | Path,
    context: int,
    documents: int = longcontext.DOCUMENTS,
    eval: str | Path | None = None,
    float_model: str | Path | bool | None = None,
    plot: str | Path | None = None,
) -> dict:
    """The long-context check of a directory some exporter wrote (:mod:`qpass.core.longcontext`): ``documents``
    documents of ``context`` tokens (from ``eval``, else the standard library's evaluation modules) and the passkey
    grid, the quantized model through its paged int8 cache (prefill, then token by token), the float model
    (``float_model``, by default the one the directory's report names) on its own. Its warnings go to stderr, one
    line each; ``plot`` names a PNG to draw it in."""
    longcontext.check_context(context, None)
    longcontext.check_documents(documents)
    text = read_text(eval, "--eval") if eval is not None else None
    if float_model is False:
        raise QpassError("--context: the check runs the float model beside the quantized one; drop --no-float")
    source = float_model
    if source is None:
        source = reporting.read(Path(out_dir)).get("model", {}).get("source")
        if not source or (source != "default" and not Path(source).exists()):
            raise QpassError(
                f"--context: the check runs the float model beside the quantized one, but the model it was compiled "
                f"from ({source or 'not recorded'}) is not here; give --float MODEL"
            )
    exporter = registry.detect(out_dir)
    loaded = exporter.load(Path(out_dir), "run")
    start = time.perf_counter()
    scorers = frontends.get(exporter.frontend).long_context_scorers(loaded, str(source), context)
    float_score, quant_score, info = scorers
    setup = time.perf_counter() - start
    measured = longcontext.measure(
        loaded.tokenizer, context, documents, text, float_score, quant_score, _calibrated_window(loaded.recipe)
    )
    section = {**info, **measured}
    section["timings_s"] = {"setup": round(setup, 3), **section["timings_s"]}
    for warning in section["warnings"]:
        print(f"qpass: {warning}", file=sys.stderr)
    if plot is not None:
        longcontext.plot(section, plot)
    return section


def _calibrated_window(recipe: Recipe | None) -> int | None:
    """The context the recipe's ranges were made to hold: the window they were calibrated over, or its
    ``--max-context`` where longer; None where it calibrated none that a longer window would change (the dynamic cache
    and dynamic W8A8 compute their scales at run time)."""
    if recipe is None:
        return None
    config = recipe.config
    if not (config.observed_kinds or config.w8a8 == "static"):  # q/k/v ranges (FAQuant, C8) or Linear inputs
        return None
    window = recipe.stats.get(CALIBRATED_WITH, {}).get("window") or None
    return max(window, config.max_context) if window and config.max_context else window


def generate(out_dir: str | Path, prompt: str, max_new_tokens: int) -> tuple[list[int], list[int], object]:
    """Greedy decoding from a directory some exporter wrote: ``(prompt ids, new ids, tokenizer)``.

    With FAQuant / C8 it runs the lowered decoder on the paged int8 KV cache (ONNX: in ONNX Runtime, the int8
    ``present.*`` fed back as ``past_key_values.*``); a W8A8-only MindIE directory keeps the KV cache in float, as
    the format says, and decodes with the model's own cache."""
    if not 1 <= max_new_tokens <= MAX_COUNT:
        raise QpassError(f"--max-new-tokens {max_new_tokens}: must be at least 1 and at most {MAX_COUNT}")
    exporter = registry.detect(out_dir)
    loaded = exporter.load(Path(out_dir), "run")
    tokenizer = loaded.tokenizer
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    prompt_ids = tokenizer(prompt)["input_ids"]
    if not prompt_ids:
        raise QpassError(f"--prompt {prompt!r}: the prompt has no tokens; give some text")
    return prompt_ids, frontends.get(exporter.frontend).generate(loaded, prompt_ids, max_new_tokens, eos), tokenizer


def inspect_model(
    model: str | LoadedModel, window: int = 64, tokenizer: str | Path | None = None
) -> list[AttentionSite]:
    """The attention sites of ``model``, found on its captured (or loaded ONNX) graph."""
    return open_model(model, window, tokenizer).attention_sites()
