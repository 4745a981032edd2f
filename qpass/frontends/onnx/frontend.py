"""The ONNX frontend: a decoder exported to ONNX, loaded with onnx-ir and run in ONNX Runtime.

It implements :class:`qpass.core.frontend.Frontend` for FAQuant and C8: sites from the graph's structure
(:mod:`qpass.passes.onnx.find_attention_sites`), calibration with the site values as extra graph outputs
of an ONNX Runtime session (the idea of ONNX Runtime's own calibrators), reduced by the core's observers,
and quantization through its onnx-ir pass pipeline (:mod:`qpass.frontends.onnx.pipeline`). W8A8 has no ONNX form
here and is refused (the dynamic cache by the ONNX exporter). A model larger than memory runs one attention site's
stage at a time (``layerwise``, :mod:`qpass.frontends.onnx.layerwise`), with the same numbers.
"""

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from qpass.core.data import check_window
from qpass.core.errors import QpassError
from qpass.core.evaluate import Score, batches, window_nll
from qpass.core.frontend import Logits
from qpass.core.observers import Observer
from qpass.core.recipe import Recipe
from qpass.core.saturation import SaturationCounter
from qpass.core.sites import AttentionSite, DecoderLayer, LinearSite, SmoothGroup
from qpass.frontends.onnx import load as loading
from qpass.frontends.onnx.layerwise import LayerwiseModel
from qpass.frontends.onnx.load import GENAI_CONFIG, GQA_FORM
from qpass.frontends.onnx.pipeline import SITES_METADATA, check_config, int8_cache, quantize_model, read_sites, site_doc
from qpass.frontends.onnx.session import Runner, greedy, session
from qpass.passes.onnx.find_attention_sites import CacheIO
from qpass.passes.onnx.gqa_centre import rotary_frequencies
from qpass.passes.onnx.quantize_gqa_kv_cache import int8_kv_genai_config


class OnnxFrontend:
    """An ONNX decoder over token ids ``[batch, window]`` (the sequence dynamic in the graph; the batch dynamic, or
    fixed by the export and run in runs of that size: :class:`qpass.frontends.onnx.session.Runner`)."""

    def __init__(self, path: Path, window: int, tokenizer_dir: str | Path | None = None, layerwise: bool = False):
        """``layerwise``: run the graph one attention site's stage at a time (:mod:`qpass.frontends.onnx.layerwise`),
        holding one layer's weights, for models larger than memory; else in one ONNX Runtime session."""
        self.path = path
        self.layerwise = layerwise
        self.spilled = False  # whether a layer-wise run kept boundary values in temporary files
        self._float_stages: LayerwiseModel | None = None
        self.model, self.found = loading.load_decoder(path)
        self.tokenizer = loading.load_tokenizer(path, tokenizer_dir, self.model)
        self.name, self.source = path.parent.name if path.name == "model.onnx" else path.stem, str(path)
        self.window = window
        self.checker_ok = loading.passes_checker(self.model)
        self.genai_config = loading.genai_config(path)
        ids = next(v for v in self.model.graph.inputs if v.name == "input_ids")
        length = ids.shape[1] if ids.shape is not None and len(ids.shape) == 2 else None
        if isinstance(length, int) and length != window:  # ONNX Runtime would refuse every window mid-run
            raise QpassError(
                f"--window {window}: MODEL {path} takes exactly {length} tokens a run (input_ids' sequence axis is "
                f"fixed); use --window {length}, or export the model with a dynamic sequence axis"
            )
        positions = (self.genai_config or {}).get("model", {}).get("context_length")
        check_window(window, positions, path, "genai_config.json model.context_length")
        self.site_docs = [site_doc(site, cache) for site, cache in self.found]

    @classmethod
    def load(
        cls, spec: str | Path, window: int, tokenizer: str | Path | None = None, layerwise: bool = False
    ) -> "OnnxFrontend":
        return cls(loading.model_path(spec), window, tokenizer, layerwise)

    def check_config(self, config) -> None:
        """Refuse, before calibrating, what this model cannot carry (see :func:`pipeline.check_config`)."""
        check_config(config, self.attention_sites())

    def model_facts(self) -> dict:
        """What the report says of the input beyond its geometry: the frontend, the opset, whether ``onnx.checker``
        accepts it (the output is then held to the same), whether its weights are external data, and whether it ran
        layer by layer."""
        external = any(isinstance(v.const_value, ir.ExternalTensor) for v in self.model.graph.initializers.values())
        facts = {
            "frontend": "onnx",
            "opset": self.model.opset_imports.get("", 0),
            "checker_full": self.checker_ok,
            "external_data": external,
            "genai": self.genai_config is not None,
        }
        return {**facts, "layerwise": True} if self.layerwise else facts

    def rotary(self) -> torch.Tensor | None:
        """GroupQueryAttention's RoPE frequencies, read from its cos/sin tables; None for the other forms, whose RoPE
        qpass does not read (:func:`~qpass.passes.onnx.gqa_centre.rotary_frequencies`)."""
        return rotary_frequencies(self.model)

    def extra_files(self, recipe: Recipe) -> dict[str, str]:
        """``genai_config.json`` for the output, where the input had one (updated for GQA's int8 cache)."""
        if self.genai_config is None:
            return {}
        config = self.genai_config
        if int8_cache(recipe.config) and any(s.form == GQA_FORM for s in self.attention_sites()):
            config = int8_kv_genai_config(config)
        return {GENAI_CONFIG: json.dumps(config, indent=4) + "\n"}

    @staticmethod
    def generate(model: ir.Model, prompt: list[int], max_new_tokens: int, eos_token_id: int | None) -> list[int]:
        """Greedy decoding of a quantized model in ONNX Runtime, its ``present.*`` fed back as ``past_key_values.*``."""
        if max_new_tokens < 1:
            raise QpassError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
        return greedy(Runner(session(model), read_sites(model)), prompt, max_new_tokens, eos_token_id)

    def attention_sites(self) -> list[AttentionSite]:
        return [site for site, _ in self.found]

    def caches(self) -> list[CacheIO | None]:
        return [cache for _, cache in self.found]

    def linear_sites(self) -> list[LinearSite]:
        raise QpassError(
            "--w8a8: qpass quantizes the attention of ONNX models (--kv-int8, --fa-quant), not their Linears; "
            "compile the PyTorch model (a Hugging Face directory or .gguf) for W8A8"
        )

    def smoothing_groups(self, linears: list[LinearSite]) -> list[SmoothGroup]:
        return []

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}  # an ONNX model's weights stay in its graph: the ONNX exporter writes the rewritten graph

    def num_parameters(self) -> int:
        return sum(
            v.const_value.size
            for v in self.model.graph.initializers.values()
            if v.const_value is not None and v.const_value.dtype.is_floating_point()
        )

    def config_json(self) -> dict:
        config = self.path.parent / "config.json"
        return json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}

    def observe(
        self, windows, observers: dict[str, Observer], batch_size: int, state_dict=None, desc: str = "calibrate"
    ) -> None:
        if state_dict is not None:
            raise QpassError("ONNX models are observed as they are; smoothing (--anti-method) needs the PyTorch model")
        names = list(observers)
        if self.layerwise:
            for _ in self.observe_layers(windows, observers, batch_size, desc):
                pass
            return
        runner = Runner(_session_with_outputs(self.model, names), self.site_docs, names)
        for batch in batches(windows, batch_size, desc):
            for name, value in zip(names, runner.run(batch)[1:]):
                observers[name].update(_channels(value))

    def observe_layers(
        self, windows, observers: dict[str, Observer], batch_size: int, desc: str = "calibrate"
    ) -> Iterator[int]:
        """:meth:`observe` one stage at a time (layer-wise), yielding each site's layer once its observers have seen
        every window (for :func:`qpass.core.calibrate.calibrate_by_layer`, which then drops them)."""
        stages = self._layerwise(self.model)
        updates = {name: (lambda value, name=name: observers[name].update(_channels(value))) for name in observers}
        done_at: dict[int, list[int]] = {}
        for site in self.attention_sites():
            names = [name for name in (site.q, site.k, site.v) if name in observers]
            if names:
                done_at.setdefault(max(stages.made.get(name, 0) for name in names), []).append(site.layer)
        for index in stages.run(windows, batch_size, desc, updates):
            self.spilled |= stages.spilled
            yield from done_at.get(index, [])

    def apply(self, recipe: Recipe, verify: bool = True):
        """``(the quantized onnx-ir model, each pass's count)``; the input file is read again, never changed."""
        model, found = loading.load_decoder(self.path)
        return quantize_model(model, found, recipe, verify=verify, full_check=self.checker_ok)

    def logits(self, recipe: Recipe | None = None, verify: bool = True) -> Logits:
        return Runner(session(self.model if recipe is None else self.apply(recipe, verify)[0]), self.site_docs).logits

    def window_nll(
        self,
        recipe: Recipe | None,
        windows: torch.Tensor,
        batch_size: int,
        desc: str = "eval",
        counters: dict[tuple[int, str], SaturationCounter] | None = None,
        program: ir.Model | None = None,
        score: Score | None = None,
    ) -> torch.Tensor:
        """Per-window NLL ``[N]`` (or ``score``) of the float model or the model quantized as ``recipe`` says
        (``program``, what :meth:`apply` returned for it, else applied here unverified)."""
        if recipe is not None and program is None:
            program = self.apply(recipe, verify=False)[0]
        return self.program_nll(self.model if recipe is None else program, windows, batch_size, desc, counters, score)

    def program_nll(
        self,
        model: ir.Model,
        windows: torch.Tensor,
        batch_size: int,
        desc: str = "eval",
        counters: dict[tuple[int, str], SaturationCounter] | None = None,
        score: Score | None = None,
    ) -> torch.Tensor:
        """Per-window NLL ``[N]`` (or ``score``) of ``model`` (the input's, or a quantized one :meth:`apply` returned),
        counting saturation into ``counters`` as :meth:`counting_logits` does; one stage at a time where layer-wise."""
        if self.layerwise:
            return self._layerwise(model).window_nll(
                windows, batch_size, desc, _count_updates(model, counters) if counters else None, score=score
            )
        logits = self.counting_logits(model, counters) if counters else Runner(session(model), self.site_docs).logits
        return window_nll(logits, windows, batch_size, desc, score)

    @staticmethod
    def layerwise_nll(
        quantized: ir.Model,
        base_dir: Path,
        windows: torch.Tensor,
        batch_size: int,
        desc: str = "eval",
        counters: dict[tuple[int, str], SaturationCounter] | None = None,
    ) -> torch.Tensor:
        """Per-window NLL ``[N]`` of a quantized model read back from ``base_dir`` (its sites from its ``qpass.sites``
        metadata), one stage at a time (``qpass eval`` of a model larger than memory)."""
        sites = read_sites(quantized)
        if any("attention" not in site for site in sites):
            raise QpassError(
                f"{base_dir}: its {SITES_METADATA} metadata does not name each site's attention (an older "
                "qpass wrote it), which a model larger than memory is cut at; compile it again"
            )
        stages = LayerwiseModel(quantized, sites, [site["attention"] for site in sites], base_dir)
        return stages.window_nll(windows, batch_size, desc, _count_updates(quantized, counters) if counters else None)

    def _layerwise(self, model: ir.Model) -> LayerwiseModel:
        """``model`` cut into stages; the input's own once (its serialized graph holds any weights kept inside it)."""
        if model is self.model and self._float_stages is not None:
            return self._float_stages
        stages = LayerwiseModel(
            model, self.site_docs, [site.attention for site in self.attention_sites()], self.path.parent
        )
        if model is self.model:
            self._float_stages = stages
        return stages

    @staticmethod
    def counting_logits(quantized, counters: dict[tuple[int, str], SaturationCounter]) -> Logits:
        """The logits function of ``quantized`` (an onnx-ir model :meth:`apply` returned, or one read back) that
        feeds the counter keyed ``(layer, kind)`` the value its site's first QuantizeLinear receives: the
        sites' q/k/v as the model's ``qpass.sites`` metadata names them, as extra outputs. GroupQueryAttention
        quantizes inside the op; there the int8 ``present.*`` it writes is read and its codes counted (as the
        values ``(code - offset) * scale``, whose code is the same: with an asymmetric recipe the graph centres K and
        V so that the cached code is the recipe's, :mod:`qpass.passes.onnx.gqa_centre`)."""
        updates = _count_updates(quantized, counters)
        outputs = list(updates)
        runner = Runner(_session_with_outputs(quantized, outputs), read_sites(quantized), outputs)

        def logits(ids: torch.Tensor) -> torch.Tensor:
            out = runner.run(ids)
            for name, value in zip(outputs, out[1:]):
                updates[name](value)
            return torch.from_numpy(out[0])

        return logits

    def reference_perplexity(self, windows: torch.Tensor, batch_size: int) -> float | None:
        """The perplexity of the input file as ONNX Runtime runs it, read from disk as it is (not through onnx-ir);
        None layer-wise (no whole-model run)."""
        from qpass.core.evaluate import perplexity

        if self.layerwise:
            return None
        return perplexity(Runner(session(self.path), self.site_docs).logits, windows, batch_size, "eval reference")

    def decoder(self, recipe: Recipe, verify: bool = True):
        return None, {"skipped": "ONNX: decoding runs in ONNX Runtime on the int8 present/past cache (qpass run)"}

    def loss_sensitivity(self, recipe: Recipe, linears: list[LinearSite], windows: torch.Tensor):
        return None

    def layers(self) -> Iterator[DecoderLayer]:
        for site in self.attention_sites():
            yield DecoderLayer(site.layer, site, ())


def _count_updates(quantized: ir.Model, counters: dict[tuple[int, str], SaturationCounter]) -> dict[str, Callable]:
    """For each counter keyed ``(layer, kind)``, the value of ``quantized`` it counts (as its ``qpass.sites`` metadata
    names the site's q/k/v, or GroupQueryAttention's int8 ``present.*``) and the function that counts a batch of it."""
    sites = read_sites(quantized)
    names = {
        (s["layer"], kind): (s[kind], s.get("form") == GQA_FORM) for s in sites for kind in ("q", "k", "v") if s[kind]
    }
    missing = sorted(set(counters) - set(names))
    if missing:
        raise QpassError(
            f"saturation: the ONNX model's {SITES_METADATA} metadata lacks sites {missing}; "
            "recompile it with this qpass"
        )

    def update(counter: SaturationCounter, codes: bool) -> Callable:
        def count(value: np.ndarray) -> None:  # a cached code is the recipe's own (the zero point centred in the graph)
            channels = _channels(value)
            counter.update((channels.float() - counter.offset) * counter.scale if codes else channels)

        return count

    return {names[key][0]: update(counter, names[key][1]) for key, counter in counters.items()}


def _channels(value: np.ndarray) -> torch.Tensor:
    """``[B, H, S, D]`` -> ``[tokens, H * D]`` (channel ``c = h * D + d``), as the core's observers take it."""
    b, h, s, d = value.shape
    return torch.from_numpy(np.ascontiguousarray(value.transpose(0, 2, 1, 3)).reshape(b * s, h * d))


def _session_with_outputs(model: ir.Model, names: list[str]):
    """A session of ``model`` with the values ``names`` as extra graph outputs (as ONNX Runtime's calibrators
    collect values); ``model`` itself is left as it was."""
    values = {v.name: v for node in model.graph for v in node.outputs}
    added = [values[n] for n in dict.fromkeys(names) if values[n] not in model.graph.outputs]
    model.graph.outputs.extend(added)
    try:
        return session(model)
    finally:
        for value in added:
            model.graph.outputs.remove(value)
