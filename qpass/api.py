"""The Python API: ``qpass.compile``, ``qpass.evaluate_saved``, ``qpass.generate``, ``qpass.inspect_model``.

It only chooses: a frontend for the model (ONNX for a ``.onnx`` file or a directory holding ``model.onnx``,
torch.export otherwise) and an exporter for the output (``--format``, or the one whose directory
``evaluate_saved`` is given). The work is theirs and the core's.
"""

import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from qpass.core import corpus, memory
from qpass.core import report as reporting
from qpass.core import saturation
from qpass.core.calibrate import calibrate, calibrate_by_layer
from qpass.core.config import EVAL_WINDOWS, QuantConfig
from qpass.core.data import calibration_text_warning, read_samples, read_text, token_windows
from qpass.core.errors import QpassError
from qpass.core.evaluate import perplexity
from qpass.core.fallback import smoothing_hint
from qpass.core.recipe import Recipe, geometry
from qpass.core.sites import AttentionSite
from qpass.exporters import registry
from qpass.frontends.onnx.frontend import OnnxFrontend
from qpass.frontends.onnx.load import is_onnx
from qpass.frontends.onnx.load import whole_model_memory as onnx_memory
from qpass.frontends.torch_export import layerwise
from qpass.frontends.torch_export.frontend import TorchExportFrontend
from qpass.models.loaders import LoadedModel, load_model

# evaluation window and batch of a directory that records no config (MindIE): QuantConfig's defaults
DEFAULT_WINDOW, DEFAULT_BATCH = (QuantConfig.__dataclass_fields__[f].default for f in ("window", "batch_size"))
FLOAT_MATCH_PCT = 0.01  # the captured float program must reproduce the model's own perplexity this closely


@dataclass
class CompileResult:
    """What ``compile`` returns: the quantized program, its recipe, the sites and the report."""

    program: object  # torch.export.ExportedProgram with Q/DQ
    recipe: Recipe
    sites: list[AttentionSite]
    report: dict
    tokenizer: object = field(repr=False, default=None)
    decoder: object = field(repr=False, default=None)  # lowered to paged int8 ops, for `qpass run`
    compiled: registry.Compiled | None = field(repr=False, default=None)  # what exporters write

    def save(self, out_dir: str | Path, force: bool = False, format: str | None = None, dtype: str | None = None) -> Path:
        """Write ``out_dir`` all or nothing with the exporter ``format`` (``qpass``, ``mindie``, ``vllm-ascend``,
        ``onnx``; by default ``onnx`` for an ONNX input, else ``qpass``); ``dtype`` is the model dtype of formats
        that store one (``mindie``: float16, the default, or bfloat16)."""
        exporter = registry.get(format or default_format(self.compiled))
        with staged_output(out_dir, force) as tmp:
            exporter.write(self.compiled, tmp, {"dtype": dtype})
            exporter.check(tmp)  # read back before it is moved into place
        return Path(out_dir)


def default_format(compiled: registry.Compiled) -> str:
    """``onnx`` for what the ONNX frontend compiled, ``qpass`` otherwise."""
    return "onnx" if compiled is not None and compiled.report.get("model", {}).get("frontend") == "onnx" else "qpass"


def output_format(model, format: str | None) -> str:
    """The exporter for ``model``: ``format`` checked against the input (an ONNX model is written as ONNX, and
    only an ONNX model is), or by default ``onnx`` for an ONNX model and ``qpass`` otherwise."""
    onnx_input = is_onnx(model)
    if format is None:
        return "onnx" if onnx_input else "qpass"
    if onnx_input and format != "onnx":
        raise QpassError(f"--format {format}: an ONNX input is written as ONNX (its weights stay in its graph); "
                         "drop --format, or compile the PyTorch model for this format")
    if format == "onnx" and not onnx_input:
        raise QpassError("--format onnx: qpass rewrites ONNX models it is given; export the model to ONNX "
                         "(torch.onnx.export or onnxruntime-genai's builder) and compile that")
    return format


def frontend_for(model: str | LoadedModel, window: int, tokenizer: str | Path | None = None, layerwise: bool = False):
    """The frontend that loads ``model``: an ONNX file (or a directory holding ``model.onnx``), a model directory,
    a ``.gguf`` file, ``default``, or a loaded model. ``tokenizer``: a tokenizer directory (ONNX models only;
    by default the tokenizer files next to the model); ``layerwise``: an ONNX model runs one layer at a time."""
    if is_onnx(model):
        return OnnxFrontend.load(model, window, tokenizer, layerwise)
    if tokenizer is not None:
        raise QpassError("--tokenizer: only ONNX models take a separate tokenizer; a Hugging Face directory or .gguf carries its own")
    return TorchExportFrontend.load(model, window)


def compile(model: str | LoadedModel, config: QuantConfig, calib: str | Path | list[str] | None = None,
            eval: str | Path | None = None, recipe: str | Path | Recipe | None = None,
            eval_windows: int = EVAL_WINDOWS, verify: bool = True, tokenizer: str | Path | None = None,
            layerwise: bool | None = None) -> CompileResult:
    """Capture ``model``, calibrate (or reuse ``recipe``), insert Q/DQ and, given ``eval``, measure perplexity.

    ``model``: ``"default"``, a ``.gguf`` file, a Hugging Face directory, a :class:`LoadedModel`, or an ONNX
    decoder (a ``.onnx`` file or a directory holding ``model.onnx``; ``tokenizer`` names its tokenizer directory
    when the files are not next to it).
    ``calib``: a ``.jsonl``/text file or a list of texts; None uses the built-in standard-library corpus.
    ``eval``: a text file, or None to skip evaluation; then the last 1/8 of the calibration windows (at least one)
    are held out of the range fitting to measure saturation on (:mod:`qpass.core.saturation`).
    Warnings (calibration text too small or too repetitive, saturation far above calibration's) go to stderr, one
    line each, and into ``report["warnings"]``.
    ``layerwise``: True calibrates a Hugging Face directory one decoder layer at a time (:func:`compile_layerwise`),
    and runs an ONNX model in ONNX Runtime one layer at a time (:mod:`qpass.frontends.onnx.staged`); None does so
    when the whole model would not fit in memory, with a one-line note; False never.
    """
    timings, warnings, held_ids = {}, [], None
    check_eval_windows(eval_windows)
    onnx_input = is_onnx(model)
    if not onnx_input and (layerwise or (layerwise is None and recipe is None and too_big(model))):
        return compile_layerwise(model, config, calib, eval=eval, recipe=recipe, eval_windows=eval_windows)
    staged = onnx_input and bool(layerwise or (layerwise is None and too_big(model)))
    # the text files first, so that a bad one is refused before the model loads
    eval_text = None if eval is None else read_text(eval, "--eval")
    calib_texts = calib if calib is None or isinstance(calib, list) or recipe is not None else read_samples(calib, "--calib")
    with _timed(timings, "load"):
        if isinstance(recipe, (str, Path)):
            recipe = Recipe.load(Path(recipe))
        if recipe is not None:
            config = recipe.config
        if onnx_input:  # loading is capture: the graph is read as it is
            frontend = frontend_for(model, config.window, tokenizer, staged)
            frontend.check_config(config)
        else:
            loaded = model if isinstance(model, LoadedModel) else load_model(model)
        text_tokenizer = frontend.tokenizer if onnx_input else loaded.tokenizer
        eval_ids = None
        if eval is not None:
            eval_ids = token_windows(text_tokenizer, [eval_text], config.window, eval_windows, "--eval")
        if recipe is None:
            samples = corpus.calibration_samples() if calib is None else calib_texts
            calib_ids = token_windows(text_tokenizer, samples, config.window, config.calib_samples, "--calib")
            if eval_ids is None and (config.fa_quant or config.kv_cache == "static"):
                # saturation is then measured on windows the ranges never saw; with --eval, every window fits them
                calib_ids, held_ids = saturation.hold_out(calib_ids)
    with _timed(timings, "capture"):
        if not onnx_input:
            frontend = frontend_for(loaded, config.window, tokenizer)
        sites = frontend.attention_sites()
    if recipe is None:
        with _timed(timings, "calibrate"):  # layer-wise: each site's ranges chosen, and its observers dropped, when done
            recipe = (calibrate_by_layer if staged else calibrate)(frontend, calib_ids, config)
        calib_info = {"file": "stdlib corpus" if calib is None else str(calib) if not isinstance(calib, list) else "texts",
                      "windows": int(calib_ids.shape[0]), "tokens": int(calib_ids.numel()),
                      "held_out_windows": 0 if held_ids is None else int(held_ids.shape[0])}
        if staged:
            calib_info["hidden_states_spilled"] = frontend.spilled
        feeds = _feeds(config, sites)
        if feeds:  # a dynamic cache alone calibrates nothing
            _warn(warnings, calibration_text_warning(calib_ids, feeds))
        _warn(warnings, smoothing_hint(recipe))
    else:
        recipe.check_matches(geometry(sites))
        calib_info = {"file": "recipe", "windows": 0, "tokens": 0}
    if staged:  # the ONNX writer's read-back runs it one layer at a time too
        calib_info["layerwise"] = True
    with _timed(timings, "passes"):
        quantized, counts = frontend.apply(recipe, verify=verify)
    with _timed(timings, "decoder"):
        decoder, decoder_info = frontend.decoder(recipe, verify=verify)
    report = {
        "model": model_info(frontend, sites),
        "config": config.to_dict(),
        "sites": [site_info(s) for s in sites],
        "passes": counts,
        "calibration": calib_info,
        "sqnr_db": dict(recipe.stats.get("sqnr_db", {})),
        "decoder": decoder_info,
    }
    if "zero_range_channels" in recipe.stats:  # channels that were 0 throughout calibration (scale 1)
        report["zero_range_channels"] = dict(recipe.stats["zero_range_channels"])
    if config.w8a8:
        report["w8a8"] = reporting.w8a8_section(recipe)
    counted, measured_on, measured_ids = saturation.counters(recipe), None, None
    if eval_ids is not None:
        with _timed(timings, "eval"):
            if staged:  # one layer at a time: no whole-model reference run
                ppl_ref = None
                ppl_float = math.exp(float(frontend.window_nll(None, eval_ids, config.batch_size, "eval float").mean()))
                ppl_quant = math.exp(float(frontend.program_nll(quantized, eval_ids, config.batch_size, "eval quantized",
                                                                counted).mean()))
            else:
                ppl_ref = frontend.reference_perplexity(eval_ids, config.batch_size)
                ppl_float = perplexity(frontend.logits(), eval_ids, config.batch_size, "eval float")
                ppl_quant = perplexity(frontend.counting_logits(quantized, counted), eval_ids, config.batch_size, "eval quantized")
        float_gap = 0.0 if ppl_ref is None else abs(ppl_float / ppl_ref - 1.0) * 100.0
        if float_gap > FLOAT_MATCH_PCT:
            raise QpassError(f"capture changed the float model: perplexity {ppl_float:.4f} vs the model's own {ppl_ref:.4f} "
                             f"({float_gap:.4f}% apart, limit {FLOAT_MATCH_PCT}%); please report this model")
        report["eval"] = {
            "file": str(eval), "tokens": int(eval_ids.numel()), "windows": int(eval_ids.shape[0]), "window": config.window,
            "ppl_reference": ppl_ref, "ppl_float": ppl_float, "ppl_quant": ppl_quant,
            "ppl_increase_pct": (ppl_quant / ppl_float - 1.0) * 100.0,
        }
        if staged:
            report["eval"]["layerwise"] = True
        measured_on, measured_ids = "eval", eval_ids
    elif held_ids is not None and counted:
        with _timed(timings, "saturation"):
            if staged:
                frontend.program_nll(quantized, held_ids, config.batch_size, "saturation", counted)
            else:
                saturation.run(frontend.counting_logits(quantized, counted), held_ids, config.batch_size)
        measured_on, measured_ids = "held_out", held_ids
    if counted:  # measured_on None (a reused recipe, no --eval): the calibration figures alone
        report["saturation"] = saturation.section(recipe, counted if measured_on else None, measured_on, measured_ids)
        _warn(warnings, saturation.warning(report["saturation"]))
    report["warnings"] = warnings
    report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    compiled = registry.Compiled(recipe, report, frontend.state_dict(), frontend.config_json(), frontend.tokenizer,
                                 quantized, decoder, frontend.extra_files(recipe))
    return CompileResult(quantized, recipe, sites, report, frontend.tokenizer, decoder, compiled)


def too_big(model, note: bool = True) -> bool:
    """Whether a whole-model compile of ``model`` (a Hugging Face directory, or an ONNX model run whole in ONNX
    Runtime) would not fit in the memory available (a note says so, unless not ``note``)."""
    if isinstance(model, LoadedModel):
        return False
    onnx_input = is_onnx(model)
    need = onnx_memory(model) if onnx_input else layerwise.whole_model_memory(model)
    available = memory.available_memory()
    if need is None or need <= available:
        return False
    if note:
        how = "running it in ONNX Runtime" if onnx_input else "calibrating"
        print(f"qpass: MODEL {model}: a whole-model compile needs about {need / 2**30:.1f} GiB and {available / 2**30:.1f} GiB "
              f"is available; {how} one decoder layer at a time (--layerwise)", file=sys.stderr)
    return True


def compile_layerwise(model: str | Path, config: QuantConfig, calib: str | Path | list[str] | None = None,
                      eval: str | Path | None = None, recipe=None, hidden_budget: int | None = None,
                      eval_windows: int = EVAL_WINDOWS) -> CompileResult:
    """Calibrate the Hugging Face directory ``model`` one decoder layer at a time (:mod:`qpass.frontends.torch_export.
    layerwise`): the result holds the recipe and the report, no program (``save`` writes ``recipe/``, ``tokenizer/``
    and the report, or with a W8A8 recipe ``format="mindie"`` / ``"vllm-ascend"``, whose writer reads the checkpoint
    one decoder layer at a time). FAQuant, C8, and W8A8 (with smoothing and any ``disable_level``). The quantized
    model runs layer by layer too (the frontend's ``window_nll``): ``eval`` is measured that way, and without it
    saturation is measured on held-out calibration windows, as :func:`compile` does."""
    refusal = next((why for why, bad in (
        ("--recipe leaves nothing to calibrate; drop --layerwise", recipe is not None),
        ("the dynamic int8 cache has nothing to calibrate; drop --layerwise", config.kv_cache == "dynamic" and not config.fa_quant and not config.w8a8),
        ("it reads a Hugging Face model directory (config.json + *.safetensors); give one", isinstance(model, LoadedModel) or is_onnx(model)),
    ) if bad), None)
    if refusal:
        raise QpassError(f"--layerwise: {refusal}")
    check_eval_windows(eval_windows)
    timings, warnings, held_ids, eval_ids = {}, [], None, None
    eval_text = None if eval is None else read_text(eval, "--eval")
    calib_texts = corpus.calibration_samples() if calib is None else calib if isinstance(calib, list) else read_samples(calib, "--calib")
    with _timed(timings, "load"):
        frontend = layerwise.LayerwiseFrontend.load(model, config.window, hidden_budget)
        if eval_text is not None:
            eval_ids = token_windows(frontend.tokenizer, [eval_text], config.window, eval_windows, "--eval")
        calib_ids = token_windows(frontend.tokenizer, calib_texts, config.window, config.calib_samples, "--calib")
        if eval_ids is None and (config.fa_quant or config.kv_cache == "static"):
            calib_ids, held_ids = saturation.hold_out(calib_ids)
    with _timed(timings, "capture"):
        sites = frontend.attention_sites()
    with _timed(timings, "calibrate"):
        recipe = calibrate_by_layer(frontend, calib_ids, config)
    _warn(warnings, calibration_text_warning(calib_ids, _feeds(config, sites)))
    _warn(warnings, smoothing_hint(recipe))
    report = {
        "model": model_info(frontend, sites), "config": config.to_dict(), "sites": [site_info(s) for s in sites],
        "passes": {}, "sqnr_db": dict(recipe.stats.get("sqnr_db", {})),
        "calibration": {"file": "stdlib corpus" if calib is None else str(calib) if not isinstance(calib, list) else "texts",
                        "windows": int(calib_ids.shape[0]), "tokens": int(calib_ids.numel()),
                        "held_out_windows": 0 if held_ids is None else int(held_ids.shape[0]),
                        "layerwise": True, "hidden_states_spilled": frontend.spilled is not None},
        "decoder": {"skipped": "layer-wise compile: the recipe only"},
    }
    if "zero_range_channels" in recipe.stats:
        report["zero_range_channels"] = dict(recipe.stats["zero_range_channels"])
    if config.w8a8:
        report["w8a8"] = reporting.w8a8_section(recipe)
    counted, measured_on, measured_ids = saturation.counters(recipe), None, None
    if eval_ids is not None:
        with _timed(timings, "eval"):
            nll_float = frontend.window_nll(None, eval_ids, config.batch_size, "eval float")
            nll_quant = frontend.window_nll(recipe, eval_ids, config.batch_size, "eval quantized", counters=counted)
        ppl_float, ppl_quant = math.exp(float(nll_float.mean())), math.exp(float(nll_quant.mean()))
        report["eval"] = {"file": str(eval), "tokens": int(eval_ids.numel()), "windows": int(eval_ids.shape[0]),
                          "window": config.window, "ppl_reference": None, "ppl_float": ppl_float, "ppl_quant": ppl_quant,
                          "ppl_increase_pct": (ppl_quant / ppl_float - 1.0) * 100.0, "layerwise": True}
        measured_on, measured_ids = "eval", eval_ids
    elif held_ids is not None and counted:
        with _timed(timings, "saturation"):
            frontend.window_nll(recipe, held_ids, config.batch_size, "saturation", counters=counted)
        measured_on, measured_ids = "held_out", held_ids
    if counted:
        report["saturation"] = saturation.section(recipe, counted if measured_on else None, measured_on, measured_ids)
        _warn(warnings, saturation.warning(report["saturation"]))
    report["warnings"] = warnings
    report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    compiled = registry.Compiled(recipe, report, frontend.state_dict(), frontend.config_json(), frontend.tokenizer,
                                 by_layer=True)
    return CompileResult(None, recipe, sites, report, frontend.tokenizer, None, compiled)


def evaluate_saved(out_dir: str | Path, eval: str | Path, eval_windows: int = EVAL_WINDOWS) -> dict:
    """Reload a directory some exporter wrote (qpass's, MindIE's) and measure its quantized perplexity on ``eval``."""
    check_eval_windows(eval_windows)
    text = read_text(eval, "--eval")  # before the directory loads
    start = time.perf_counter()
    loaded = registry.detect(out_dir).load(Path(out_dir), "eval")
    counted = saturation.counters(loaded.recipe) if loaded.recipe is not None else {}
    staged = loaded.format == "onnx" and too_big(Path(out_dir) / "model.onnx", note=False)  # one layer at a time
    if loaded.program is not None:
        config = loaded.recipe.config
        window, batch_size = config.window, config.batch_size
        frontend_class = OnnxFrontend if loaded.format == "onnx" else TorchExportFrontend
        logits = None if staged else frontend_class.counting_logits(loaded.program, counted)
    else:
        window = min(DEFAULT_WINDOW, getattr(loaded.model.config, "max_position_embeddings", None) or DEFAULT_WINDOW)
        batch_size = DEFAULT_BATCH
        logits = _model_logits(loaded, window, counted)
    ids = token_windows(loaded.tokenizer, [text], window, eval_windows, "--eval")
    loaded_s = time.perf_counter() - start
    start = time.perf_counter()
    if staged:
        nll = OnnxFrontend.staged_nll(loaded.program, Path(out_dir), ids, batch_size, "eval quantized", counted)
        ppl = math.exp(float(nll.mean()))
    else:
        ppl = perplexity(logits, ids, batch_size, "eval quantized")
    timings = {"load": round(loaded_s, 3), "eval": round(time.perf_counter() - start, 3)}
    result = {"file": str(eval), **loaded.info, "tokens": int(ids.numel()), "windows": int(ids.shape[0]), "window": window,
              "ppl_quant": ppl, "timings_s": timings if loaded.program is None else {"eval": timings["eval"]}}
    if staged:
        result["layerwise"] = True
    if counted:
        result["saturation"] = saturation.section(loaded.recipe, counted, "eval", ids)
        result["warnings"] = _warn([], saturation.warning(result["saturation"]))
    return result


def generate(out_dir: str | Path, prompt: str, max_new_tokens: int) -> tuple[list[int], list[int], object]:
    """Greedy decoding from a directory some exporter wrote: ``(prompt ids, new ids, tokenizer)``.

    With FAQuant / C8 it runs the lowered decoder on the paged int8 KV cache; a W8A8-only MindIE directory
    keeps the KV cache in float, as the format says, and decodes with the model's own cache."""
    from qpass.frontends.torch_export.decoder import build_decoder, generate_lowered, generate_with_model

    if max_new_tokens < 1:
        raise QpassError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    loaded = registry.detect(out_dir).load(Path(out_dir), "run")
    tokenizer = loaded.tokenizer
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    prompt_ids = tokenizer(prompt)["input_ids"]
    if loaded.format == "onnx":  # ONNX Runtime, feeding the int8 present.* back as past_key_values.*
        return prompt_ids, OnnxFrontend.generate(loaded.program, prompt_ids, max_new_tokens, eos), tokenizer
    if loaded.decoder is not None:
        return prompt_ids, generate_lowered(loaded.decoder, prompt_ids, max_new_tokens, eos_token_id=eos), tokenizer
    if loaded.recipe is not None:
        _, lowered = build_decoder(loaded.model, loaded.recipe)
        return prompt_ids, generate_lowered(lowered, prompt_ids, max_new_tokens, eos_token_id=eos), tokenizer
    return prompt_ids, generate_with_model(loaded.model, prompt_ids, max_new_tokens, eos), tokenizer


def _model_logits(loaded: registry.Loaded, window: int, counted: dict):
    """The logits of a model read from a weight directory, its attention quantized by the frontend, feeding the
    saturation ``counted``."""
    frontend = frontend_for(LoadedModel(loaded.model, loaded.tokenizer, "directory", "directory"), window)
    if loaded.recipe is None:
        return frontend.logits()
    loaded.recipe.check_matches(geometry(frontend.attention_sites()))
    return frontend.counting_logits(frontend.apply(loaded.recipe)[0], counted)


def _feeds(config: QuantConfig, sites: list[AttentionSite]) -> str:
    """What calibration ranges are for, in words: "FAQuant q/k/v and C8 k/v at 2 attention sites"."""
    attention = [name for name, on in (("FAQuant q/k/v", config.fa_quant), ("C8 k/v", config.kv_cache == "static")) if on]
    parts = [f"{' and '.join(attention)} at {len(sites)} attention sites"] if attention else []
    return " and ".join(parts + (["the W8A8 Linears' inputs"] if config.w8a8 else []))


def _warn(warnings: list[str], message: str | None) -> list[str]:
    """Print ``message`` on stderr as one line, as the loaders' warnings are, and keep it in ``warnings``."""
    if message is not None:
        print(f"qpass: {message}", file=sys.stderr)
        warnings.append(message)
    return warnings


def inspect_model(model: str | LoadedModel, window: int = 64, tokenizer: str | Path | None = None) -> list[AttentionSite]:
    """The attention sites of ``model``, found on its captured (or loaded ONNX) graph."""
    return frontend_for(model, window, tokenizer).attention_sites()


def model_info(frontend, sites: list[AttentionSite]) -> dict:
    first = sites[0]
    return {"name": frontend.name, "source": frontend.source, "layers": len(sites), "num_heads": first.num_heads,
            "num_kv_heads": first.num_kv_heads, "head_dim": first.head_dim,
            "parameters": frontend.num_parameters(), **frontend.model_facts()}


def site_info(site: AttentionSite) -> dict:
    return {"layer": site.layer, "form": site.form, "num_heads": site.num_heads, "num_kv_heads": site.num_kv_heads,
            "head_dim": site.head_dim, "rope": site.rope, "qk_norm": site.qk_norm,
            "q_from": site.q_from, "k_from": site.k_from, "v_from": site.v_from}


def check_eval_windows(eval_windows: int) -> None:
    if isinstance(eval_windows, bool) or not isinstance(eval_windows, int) or eval_windows < 1:
        raise QpassError(f"--eval-windows {eval_windows}: must be an integer, at least 1")


def check_output_dir(out_dir: str | Path, force: bool) -> None:
    """Refuse an output directory that exists and is not empty, unless ``force``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise QpassError(f"-o {out}: exists and is not a directory; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise QpassError(f"-o {out}: directory exists and is not empty; choose another, or pass --force to replace it")
    parent = next(p for p in out.absolute().parents if p.exists())  # where the output's directories will be made
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise QpassError(f"-o {out}: cannot create it under {parent} (not a writable directory); choose an output path you can write")


@contextmanager
def staged_output(out_dir: str | Path, force: bool):
    """Yield a temporary directory beside ``out_dir``; move it into place only if the block succeeds."""
    out = Path(out_dir)
    check_output_dir(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.qpass-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); the output is an ordinary directory
    except OSError as err:
        raise QpassError(f"-o {out}: cannot create it ({err.strerror}); choose an output path you can write") from None
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _timed(timings: dict, stage: str):
    start = time.perf_counter()
    yield
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
