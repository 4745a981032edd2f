"""The one compile road, for every frontend in every mode (whole model, layer-wise):
texts -> token windows -> hold-out -> calibrate -> apply -> decoder -> evaluate -> saturation -> report -> Compiled.

It asks only the :class:`qpass.core.frontend.Frontend` protocol; the API chooses the frontend and its mode.
"""

import math
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from qpass.core import corpus, saturation
from qpass.core import report as reporting
from qpass.core.calibrate import calibrate
from qpass.core.config import QuantConfig, RunSettings
from qpass.core.data import calibration_text_warning, token_windows
from qpass.core.errors import QpassError
from qpass.core.fallback import check_level, smoothing_hint
from qpass.core.frontend import Frontend
from qpass.core.recipe import CALIBRATED_WITH, Recipe, geometry
from qpass.core.sites import AttentionSite

FLOAT_MATCH_PCT = 0.01  # the captured float program must reproduce the model's own perplexity this closely


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
    files: dict[str, str] = field(repr=False, default_factory=dict)  # text files carried over (genai_config.json)
    layerwise: bool = False  # state_dict reads each tensor when looked up: write layer by layer
    sites: list[AttentionSite] = field(repr=False, default_factory=list)
    inputs: tuple = ()  # the paths it was compiled from, which no output may replace or lie in


@dataclass(frozen=True)
class Texts:
    """The text a compile reads, read before the model loads (so a bad file is refused first)."""

    calib: list[str] | None  # None: the built-in standard-library corpus
    calib_name: str  # for the report: a file name, "texts" or "stdlib corpus"
    eval: str | None = None
    eval_name: str | None = None


def compile_model(
    frontend: Frontend,
    config: QuantConfig,
    run: RunSettings,
    texts: Texts,
    recipe: Recipe | None = None,
    verify: bool = True,
    timings: dict | None = None,
) -> Compiled:
    """Calibrate ``frontend``'s model as ``config`` says (or reuse ``recipe``), quantize it, measure it, report it."""
    timings, warnings = {} if timings is None else timings, []
    with _timed(timings, "load"):
        eval_ids, calib_ids, held_ids = _windows(frontend, config, run, texts, recipe is None)
    with _timed(timings, "capture"):
        sites = frontend.attention_sites()
    if recipe is None:
        if config.w8a8:  # what the Linears and the windows cannot satisfy, refused before any calibration run
            check_level(config.disable_level, len(frontend.linear_sites()), int(calib_ids.shape[0]))
        with _timed(timings, "calibrate"):
            recipe = calibrate(frontend, calib_ids, config, run.batch_size)
        recipe = recipe.replace(stats={**recipe.stats, CALIBRATED_WITH: {"window": run.window}})
        calib_info = {
            "file": texts.calib_name,
            "windows": int(calib_ids.shape[0]),
            "tokens": int(calib_ids.numel()),
            "held_out_windows": 0 if held_ids is None else int(held_ids.shape[0]),
        }
        feeds = _feeds(config, sites)
        if feeds:  # a dynamic cache alone calibrates no range (its key smoothing is searched on the sample)
            _warn(warnings, calibration_text_warning(calib_ids, feeds))
        _warn(warnings, smoothing_hint(recipe))
    else:
        recipe.check_matches(geometry(sites))
        calib_info = {"file": "recipe", "windows": 0, "tokens": 0}
    if frontend.layerwise:
        calib_info.update(layerwise=True, hidden_states_spilled=bool(frontend.spilled))
    with _timed(timings, "passes"):
        program, counts = frontend.apply(recipe, verify=verify)
    with _timed(timings, "decoder"):
        decoder, decoder_info = frontend.decoder(recipe, verify=verify)
    report = {
        "model": model_info(frontend, sites),
        "config": config.to_dict(),
        "run": {k: v for k, v in asdict(run).items() if k != "calib_samples" or calib_ids is not None},  # as read
        "sites": [site_info(s) for s in sites],
        "passes": counts,
        "calibration": calib_info,
        "sqnr_db": dict(recipe.stats.get("sqnr_db", {})),
        "decoder": decoder_info,
    }
    if "zero_range_channels" in recipe.stats:  # channels that were 0 throughout calibration (scale 1)
        report["zero_range_channels"] = dict(recipe.stats["zero_range_channels"])
    if "key_smoothing" in recipe.stats:  # the dynamic cache: per site, the power searched (0: none) or why not
        report["key_smoothing"] = dict(recipe.stats["key_smoothing"])
    if config.w8a8:
        report["w8a8"] = reporting.w8a8_section(recipe)
    _measure(frontend, recipe, program, run, texts, eval_ids, held_ids, report, warnings, timings)
    report["warnings"] = warnings
    report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    return Compiled(
        recipe,
        report,
        frontend.state_dict(),
        frontend.config_json(),
        frontend.tokenizer,
        program,
        decoder,
        frontend.extra_files(recipe),
        frontend.layerwise,
        sites,
    )


def _windows(frontend: Frontend, config: QuantConfig, run: RunSettings, texts: Texts, calibrating: bool):
    """``(eval windows or None, calibration windows or None, held-out windows or None)``: without evaluation text,
    saturation is measured on calibration windows the ranges never saw; with it, every window fits them."""
    tokenizer, calib_ids, held_ids = frontend.tokenizer, None, None
    eval_ids = (
        None if texts.eval is None else token_windows(tokenizer, [texts.eval], run.window, run.eval_windows, "--eval")
    )
    if calibrating:
        samples = corpus.calibration_samples() if texts.calib is None else texts.calib
        calib_ids = token_windows(tokenizer, samples, run.window, run.calib_samples, "--calib")
        if eval_ids is None and config.observed_kinds:
            calib_ids, held_ids = saturation.hold_out(calib_ids)
    return eval_ids, calib_ids, held_ids


def _measure(
    frontend: Frontend,
    recipe: Recipe,
    program,
    run: RunSettings,
    texts: Texts,
    eval_ids,
    held_ids,
    report: dict,
    warnings: list[str],
    timings: dict,
) -> None:
    """Perplexity of the float and the quantized model on the evaluation text, and saturation (on it, or on the
    held-out calibration windows), into ``report``."""
    counted, measured_on, measured_ids = saturation.counters(recipe), None, None
    if eval_ids is not None:
        with _timed(timings, "eval"):
            ppl_ref = frontend.reference_perplexity(eval_ids, run.batch_size)  # None: layer-wise
            ppl_float = _ppl(frontend.window_nll(None, eval_ids, run.batch_size, "eval float"))
            ppl_quant = _ppl(frontend.window_nll(recipe, eval_ids, run.batch_size, "eval quantized", counted, program))
        float_gap = 0.0 if ppl_ref is None else abs(ppl_float / ppl_ref - 1.0) * 100.0
        if float_gap > FLOAT_MATCH_PCT:
            raise QpassError(
                f"capture changed the float model: perplexity {ppl_float:.4f} vs the model's own "
                f"{ppl_ref:.4f} ({float_gap:.4f}% apart, limit {FLOAT_MATCH_PCT}%); please report this model"
            )
        report["eval"] = {
            "file": texts.eval_name,
            "tokens": int(eval_ids.numel()),
            "windows": int(eval_ids.shape[0]),
            "window": run.window,
            "ppl_reference": ppl_ref,
            "ppl_float": ppl_float,
            "ppl_quant": ppl_quant,
            "ppl_increase_pct": (ppl_quant / ppl_float - 1.0) * 100.0,
        }
        if frontend.layerwise:
            report["eval"]["layerwise"] = True
        measured_on, measured_ids = "eval", eval_ids
    elif held_ids is not None and counted:
        with _timed(timings, "saturation"):
            frontend.window_nll(recipe, held_ids, run.batch_size, "saturation", counted, program)
        measured_on, measured_ids = "held_out", held_ids
    if counted:  # measured_on None (a reused recipe, no --eval): the calibration figures alone
        report["saturation"] = saturation.section(recipe, counted if measured_on else None, measured_on, measured_ids)
        _warn(warnings, saturation.warning(report["saturation"]))


def _ppl(nll: torch.Tensor) -> float:
    """Perplexity from per-window mean NLLs ``[N]`` (windows of one length: the mean over every token)."""
    return math.exp(float(nll.mean()))


def _feeds(config: QuantConfig, sites: list[AttentionSite]) -> str:
    """What calibration ranges are for, in words: "FAQuant q/k/v and C8 k/v at 2 attention sites"."""
    attention = [
        name for name, on in (("FAQuant q/k/v", config.fa_quant), ("C8 k/v", config.kv_cache == "static")) if on
    ]
    parts = [f"{' and '.join(attention)} at {len(sites)} attention sites"] if attention else []
    if config.w8a8 == "static":
        parts.append("the W8A8 Linears' inputs")
    elif config.w8a8 == "dynamic" and config.anti_method:  # dynamic W8A8 calibrates only its smoothing
        parts.append("the smoothing of the W8A8 Linears")
    return " and ".join(parts)


def _warn(warnings: list[str], message: str | None) -> list[str]:
    """Print ``message`` on stderr as one line, as the loaders' warnings are, and keep it in ``warnings``."""
    if message is not None:
        print(f"qpass: {message}", file=sys.stderr)
        warnings.append(message)
    return warnings


def model_info(frontend: Frontend, sites: list[AttentionSite]) -> dict:
    first = sites[0]
    return {
        "name": frontend.name,
        "source": frontend.source,
        "layers": len(sites),
        "num_heads": first.num_heads,
        "num_kv_heads": first.num_kv_heads,
        "head_dim": first.head_dim,
        "parameters": frontend.num_parameters(),
        **frontend.model_facts(),
    }


def site_info(site: AttentionSite) -> dict:
    return {
        "layer": site.layer,
        "form": site.form,
        "num_heads": site.num_heads,
        "num_kv_heads": site.num_kv_heads,
        "head_dim": site.head_dim,
        "rope": site.rope,
        "qk_norm": site.qk_norm,
        "q_from": site.q_from,
        "k_from": site.k_from,
        "v_from": site.v_from,
    }


@contextmanager
def _timed(timings: dict, stage: str):
    start = time.perf_counter()
    yield
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
