"""The Python API: ``qpass.compile`` and ``qpass.evaluate_saved``, which the CLI calls too."""

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.export import ExportedProgram

from qpass import corpus
from qpass.calibrate import calibrate, geometry
from qpass.capture import capture, param_names  # noqa: F401  (param_names: part of this module's API)
from qpass.config import QuantConfig
from qpass.data import read_samples, read_text, token_windows
from qpass.errors import QpassError
from qpass.evaluate import perplexity, reference_perplexity
from qpass.generate import DECODER_FILE, compile_decoder
from qpass.models.loaders import LoadedModel, load_model
from qpass.passes.find_attention_sites import AttentionSite, find_attention_sites
from qpass.pipeline import quantize_program
from qpass.recipe import Recipe
from qpass import report as reporting

PROGRAM_FILE = "program.pt2"
RECIPE_DIR = "recipe"
TOKENIZER_DIR = "tokenizer"
DEFAULT_EVAL_WINDOWS = 32
SAVE_FORMATS = ("qpass", "mindie")
FLOAT_MATCH_PCT = 0.01  # the captured float program must reproduce the model's own perplexity this closely


@dataclass
class CompileResult:
    """What ``compile`` returns: the quantized program, its recipe, the sites and the report."""

    program: ExportedProgram
    recipe: Recipe
    sites: list[AttentionSite]
    report: dict
    tokenizer: object = field(repr=False, default=None)
    decoder: ExportedProgram | None = field(repr=False, default=None)  # lowered to paged int8 ops, for `qpass run`
    model: torch.nn.Module | None = field(repr=False, default=None)  # the float model, for --format mindie

    def save(self, out_dir: str | Path, force: bool = False, format: str = "qpass", dtype: str = "float16") -> Path:
        """Write ``out_dir`` all or nothing. ``format="qpass"``: program.pt2, recipe/, tokenizer/ and the report;
        ``format="mindie"``: the MindIE weight directory in model dtype ``dtype`` (see ``qpass/mindie.py``) and the report."""
        if format not in SAVE_FORMATS:
            raise QpassError(f"--format {format}: choose one of {', '.join(SAVE_FORMATS)}")
        with staged_output(out_dir, force) as tmp:
            if format == "mindie":
                self._write_mindie(tmp, dtype)
                reporting.write(self.report, tmp)
                return Path(out_dir)
            torch.export.save(self.program, str(tmp / PROGRAM_FILE))
            if self.decoder is not None:
                torch.export.save(self.decoder, str(tmp / DECODER_FILE))
            self.recipe.save(tmp / RECIPE_DIR)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
            reporting.write(self.report, tmp)
        return Path(out_dir)

    def _write_mindie(self, directory: Path, dtype: str) -> None:
        from qpass.mindie import MODEL_DTYPES, export_mindie, smoothing_groups
        from qpass.smoothing import apply_smoothing

        if dtype not in MODEL_DTYPES:
            raise QpassError(f"--dtype {dtype}: the MindIE format stores {' or '.join(MODEL_DTYPES)} models; choose one of those")
        if self.model is None:
            raise QpassError("--format mindie needs the float model; save the CompileResult that qpass.compile returned")
        state = apply_smoothing(self.model.state_dict(), smoothing_groups(self.recipe), self.recipe.tensors)
        config = self.model.config.to_dict()
        config.setdefault("architectures", [type(self.model).__name__])  # a GGUF-made config has none
        export_mindie(config, state, self.recipe, self.tokenizer, directory, MODEL_DTYPES[dtype])


def compile(model: str | LoadedModel, config: QuantConfig, calib: str | Path | list[str] | None = None,
            eval: str | Path | None = None, recipe: str | Path | Recipe | None = None,
            eval_windows: int = DEFAULT_EVAL_WINDOWS, verify: bool = True) -> CompileResult:
    """Capture ``model``, calibrate (or reuse ``recipe``), insert Q/DQ and, given ``eval``, measure perplexity.

    ``model``: ``"default"``, a ``.gguf`` file, a Hugging Face directory, or a :class:`LoadedModel`.
    ``calib``: a ``.jsonl``/text file or a list of texts; None uses the built-in standard-library corpus.
    ``eval``: a text file, or None to skip evaluation.
    """
    timings = {}
    with _timed(timings, "load"):
        if isinstance(recipe, (str, Path)):
            recipe = Recipe.load(Path(recipe))
        if recipe is not None:
            config = recipe.config
        loaded = model if isinstance(model, LoadedModel) else load_model(model)
        eval_ids = None
        if eval is not None:
            eval_ids = token_windows(loaded.tokenizer, [read_text(eval, "--eval")], config.window, eval_windows, "--eval")
        if recipe is None:
            samples = corpus.calibration_samples() if calib is None else (
                calib if isinstance(calib, list) else read_samples(calib, "--calib"))
            calib_ids = token_windows(loaded.tokenizer, samples, config.window, config.calib_samples, "--calib")
    with _timed(timings, "capture"):
        program = capture(loaded.model, config.window)
        sites = find_attention_sites(program.graph, param_names(program))
    if recipe is None:
        with _timed(timings, "calibrate"):
            recipe = calibrate(program, sites, calib_ids, config)
        calib_info = {"file": "stdlib corpus" if calib is None else str(calib) if not isinstance(calib, list) else "texts",
                      "windows": int(calib_ids.shape[0]), "tokens": int(calib_ids.numel())}
    else:
        recipe.check_matches(geometry(sites))
        calib_info = {"file": "recipe", "windows": 0, "tokens": 0}
    with _timed(timings, "passes"):
        quantized, counts = quantize_program(program, sites, recipe, verify=verify)
    with _timed(timings, "decoder"):
        decoder, decoder_info = compile_decoder(loaded.model, recipe, verify=verify)
    report = {
        "model": model_info(loaded, sites),
        "config": config.to_dict(),
        "sites": [site_info(s) for s in sites],
        "passes": counts,
        "calibration": calib_info,
        "sqnr_db": recipe.stats.get("sqnr_db", {}),
        "decoder": decoder_info,
    }
    if config.w8a8:
        report["w8a8"] = reporting.w8a8_section(recipe)
    if eval_ids is not None:
        with _timed(timings, "eval"):
            ppl_ref = reference_perplexity(loaded.model, eval_ids, config.batch_size)
            ppl_float = perplexity(program.module(), eval_ids, config.batch_size, "eval float")
            ppl_quant = perplexity(quantized.module(), eval_ids, config.batch_size, "eval quantized")
        float_gap = abs(ppl_float / ppl_ref - 1.0) * 100.0
        if float_gap > FLOAT_MATCH_PCT:
            raise QpassError(f"capture changed the float model: perplexity {ppl_float:.4f} vs the model's own {ppl_ref:.4f} "
                             f"({float_gap:.4f}% apart, limit {FLOAT_MATCH_PCT}%); please report this model")
        report["eval"] = {
            "file": str(eval), "tokens": int(eval_ids.numel()), "windows": int(eval_ids.shape[0]), "window": config.window,
            "ppl_reference": ppl_ref, "ppl_float": ppl_float, "ppl_quant": ppl_quant,
            "ppl_increase_pct": (ppl_quant / ppl_float - 1.0) * 100.0,
        }
    report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    return CompileResult(quantized, recipe, sites, report, loaded.tokenizer, decoder, model=loaded.model)


def evaluate_saved(out_dir: str | Path, eval: str | Path, eval_windows: int = DEFAULT_EVAL_WINDOWS) -> dict:
    """Reload a compile's program, recipe and tokenizer (or a MindIE directory) and measure the quantized
    perplexity on ``eval``."""
    from qpass.mindie import evaluate_mindie, is_mindie_dir

    if is_mindie_dir(out_dir):
        return evaluate_mindie(out_dir, eval, eval_windows)
    out_dir = Path(out_dir)
    program_path = out_dir / PROGRAM_FILE
    if not program_path.is_file():
        raise QpassError(f"{out_dir}: no {PROGRAM_FILE}; give a directory written by `qpass compile -o`")
    recipe = Recipe.load(out_dir / RECIPE_DIR)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(out_dir / TOKENIZER_DIR))
    except (OSError, ValueError) as err:
        raise QpassError(f"{out_dir}: cannot load {TOKENIZER_DIR}/ ({err}); recompile into a fresh directory") from err
    program = torch.export.load(str(program_path))
    config = recipe.config
    ids = token_windows(tokenizer, [read_text(eval, "--eval")], config.window, eval_windows, "--eval")
    start = time.perf_counter()
    ppl = perplexity(program.module(), ids, config.batch_size, "eval quantized")
    return {"file": str(eval), "tokens": int(ids.numel()), "windows": int(ids.shape[0]), "window": config.window,
            "ppl_quant": ppl, "timings_s": {"eval": round(time.perf_counter() - start, 3)}}


def inspect_model(model: str | LoadedModel, window: int = 64) -> list[AttentionSite]:
    """The attention sites of ``model``, found on its captured graph."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    program = capture(loaded.model, window)
    return find_attention_sites(program.graph, param_names(program))


def model_info(loaded: LoadedModel, sites: list[AttentionSite]) -> dict:
    first = sites[0]
    return {"name": loaded.name, "source": loaded.source, "layers": len(sites), "num_heads": first.num_heads,
            "num_kv_heads": first.num_kv_heads, "head_dim": first.head_dim,
            "parameters": sum(p.numel() for p in loaded.model.parameters())}


def site_info(site: AttentionSite) -> dict:
    return {"layer": site.layer, "form": site.form, "num_heads": site.num_heads, "num_kv_heads": site.num_kv_heads,
            "head_dim": site.head_dim, "rope": site.rope, "qk_norm": site.qk_norm,
            "q_from": site.q_from, "k_from": site.k_from, "v_from": site.v_from}


def check_output_dir(out_dir: str | Path, force: bool) -> None:
    """Refuse an output directory that exists and is not empty, unless ``force``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise QpassError(f"-o {out}: exists and is not a directory; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise QpassError(f"-o {out}: directory exists and is not empty; choose another, or pass --force to replace it")


@contextmanager
def staged_output(out_dir: str | Path, force: bool):
    """Yield a temporary directory beside ``out_dir``; move it into place only if the block succeeds."""
    out = Path(out_dir)
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.qpass-", dir=out.parent))
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


def load_report(out_dir: str | Path) -> dict:
    return json.loads((Path(out_dir) / "report.json").read_text(encoding="utf-8"))
