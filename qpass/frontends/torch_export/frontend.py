"""The torch.export frontend: a Hugging Face causal LM captured as an ``ExportedProgram``.

It implements :class:`qpass.core.frontend.Frontend`: sites from the fx graph's structure, observation
through taps inserted after the observed nodes of the unlifted program, quantization through its
pass pipeline (:mod:`qpass.frontends.torch_export.pipeline`), loss sensitivity through autograd.
"""

from collections.abc import Iterator

import torch

from qpass.core.data import check_window
from qpass.core.errors import QpassError
from qpass.core.evaluate import Score, batches, window_nll
from qpass.core.frontend import Logits
from qpass.core.int8 import fake_quant, fake_quant_weight
from qpass.core.observers import Observer
from qpass.core.recipe import Recipe
from qpass.core.saturation import SaturationCounter
from qpass.core.sites import AttentionSite, DecoderLayer, LinearSite, SmoothGroup
from qpass.frontends.torch_export.capture import WRAPPER_PREFIX, capture, param_names
from qpass.frontends.torch_export.decoder import compile_decoder
from qpass.frontends.torch_export.pipeline import quantize_program, smoothed_state_dict
from qpass.models.loaders import LoadedModel, load_model, rotary_frequencies
from qpass.passes.fx.find_attention_sites import find_attention_sites
from qpass.passes.fx.find_linear_sites import find_linear_sites, find_smoothing_groups
from qpass.passes.fx.qdq import DEQUANTIZE, QUANTIZE


class TorchExportFrontend:
    """A loaded model captured over token ids ``[batch, window]`` (the batch size is dynamic)."""

    layerwise = False  # the mode: the whole model at once
    spilled = False

    def __init__(self, loaded: LoadedModel, window: int):
        positions = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None)
        check_window(window, positions, loaded.name)  # before a capture over positions it never learnt
        self.loaded, self.model, self.tokenizer = loaded, loaded.model, loaded.tokenizer
        self.name, self.source = loaded.name, loaded.source
        self.program = capture(loaded.model, window)
        self._names = param_names(self.program)
        self._sites: list[AttentionSite] | None = None

    @classmethod
    def load(cls, spec: str | LoadedModel, window: int) -> "TorchExportFrontend":
        return cls(spec if isinstance(spec, LoadedModel) else load_model(spec), window)

    def attention_sites(self) -> list[AttentionSite]:
        if self._sites is None:
            self._sites = find_attention_sites(self.program.graph, self._names)
        return self._sites

    def linear_sites(self) -> list[LinearSite]:
        return find_linear_sites(self.program.graph, self._names)

    def smoothing_groups(self, linears: list[LinearSite]) -> list[SmoothGroup]:
        return find_smoothing_groups(self.program.graph, linears, self._names)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def config_json(self) -> dict:
        return self.loaded.config_json()

    def model_facts(self) -> dict:
        return {"frontend": "torch.export"}

    def check_config(self, config) -> None:
        """Every policy runs on a captured model."""

    def extra_files(self, recipe: Recipe) -> dict[str, str]:
        return {}  # the exporters write everything a PyTorch model's artefacts hold

    def rotary(self) -> torch.Tensor | None:
        return rotary_frequencies(self.model, self.model.config)

    def observe(
        self, windows, observers: dict[str, Observer], batch_size: int, state_dict=None, desc: str = "calibrate"
    ) -> None:
        gm = self.program.module()
        if state_dict is not None:
            set_parameters(gm, state_dict)
        attention_values = {getattr(s, kind) for s in self.attention_sites() for kind in ("q", "k", "v")}
        nodes = {n.name: n for n in gm.graph.nodes}
        for i, (name, obs) in enumerate(observers.items()):
            gm.add_submodule(f"qpass_tap_{i}", _Tap(obs, name in attention_values))
            with gm.graph.inserting_after(nodes[name]):
                gm.graph.call_module(f"qpass_tap_{i}", (nodes[name],))
        gm.recompile()
        with torch.no_grad():
            for batch in batches(windows, batch_size, desc):
                gm(batch)

    def apply(self, recipe: Recipe, verify: bool = True):
        """``(quantized ExportedProgram, each pass's count)``."""
        return quantize_program(self.program, self.attention_sites(), recipe, verify=verify)

    def logits(self, recipe: Recipe | None = None, verify: bool = True) -> Logits:
        return self.program.module() if recipe is None else self.apply(recipe, verify)[0].module()

    def window_nll(
        self,
        recipe: Recipe | None,
        windows: torch.Tensor,
        batch_size: int,
        desc: str = "eval",
        counters: dict[tuple[int, str], SaturationCounter] | None = None,
        program=None,
        score: Score | None = None,
    ) -> torch.Tensor:
        """Per-window NLL ``[N]`` (or ``score``) of the float model or the model quantized as ``recipe`` says
        (``program``, what :meth:`apply` returned for it, else applied here unverified), feeding the saturation
        ``counters``."""
        if recipe is None:
            return window_nll(self.logits(), windows, batch_size, desc, score)
        if program is None:
            program = self.apply(recipe, verify=False)[0]
        return window_nll(self.counting_logits(program, counters or {}), windows, batch_size, desc, score)

    @staticmethod
    def counting_logits(quantized, counters: dict[tuple[int, str], SaturationCounter]) -> Logits:
        """The logits function of ``quantized`` (an ``ExportedProgram`` as :meth:`apply` returns it, or as qpass's
        directory holds it) that feeds the counter keyed ``(layer, kind)`` the values the first int8 Quantize
        on that site's q/k/v receives, as ``[tokens, channels]`` (``c = h * D + d``). The sites are found on
        the quantized graph (their q/k/v are then the Dequantize outputs attention reads); walking back
        through the Quantize/Dequantize pairs gives the value before the first one (C8's, with FAQuant)."""
        gm = quantized.module()
        if not counters:
            return gm
        nodes = {n.name: n for n in gm.graph.nodes}
        for site in find_attention_sites(gm.graph):
            for kind in ("q", "k", "v"):
                counter = counters.get((site.layer, kind))
                if counter is None:
                    continue
                value, first = nodes[getattr(site, kind)], None
                while value.target is DEQUANTIZE and value.args[0].target is QUANTIZE:
                    first = value.args[0]
                    value = first.args[0]
                if first is None:
                    raise QpassError(
                        f"saturation: {kind} of attention layer {site.layer} has no int8 Quantize in this program "
                        "although its recipe has scales for it; please report this model"
                    )
                name = f"qpass_saturation_{site.layer}_{kind}"
                gm.add_submodule(name, _Tap(counter, attention=True))
                with gm.graph.inserting_after(value):
                    gm.graph.call_module(name, (value,))
        gm.recompile()
        return gm

    def loss_sensitivity(self, recipe: Recipe, linears: list[LinearSite], windows: torch.Tensor) -> dict[str, float]:
        """Per Linear, ``sum over tokens (dL/dy . dy)^2``: the squared first-order change of each token's loss
        when that Linear alone runs W8A8 (``dy``), from one forward and one backward over ``windows``."""
        gm = self.program.module()
        smoothed = smoothed_state_dict(self.program, recipe)
        set_parameters(gm, {k.removeprefix(WRAPPER_PREFIX): v for k, v in smoothed.items()})
        graph, nodes, taps = gm.graph, {n.name: n for n in gm.graph.nodes}, {}
        for i, site in enumerate(linears):
            bias = _param(gm, f"{site.module}.bias").detach() if site.bias is not None else None
            taps[site.module] = _ErrorTap(_param(gm, f"{site.module}.weight"), bias, *recipe.linear(site.module))
            gm.add_submodule(f"qpass_error_tap_{i}", taps[site.module])
            linear = nodes[site.node]
            with graph.inserting_after(linear):
                tap = graph.call_module(f"qpass_error_tap_{i}", (nodes[site.input], linear))
            linear.replace_all_uses_with(tap, delete_user_cb=lambda user, tap=tap: user is not tap)
        gm.recompile()
        with torch.enable_grad():
            logits = gm(windows)
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), windows[:, 1:].flatten(), reduction="sum"
            )
            grads = torch.autograd.grad(nll, [t.leaf for t in taps.values()])
        return {name: round(float(((g * t.dy).sum(-1)).pow(2).sum()), 6) for (name, t), g in zip(taps.items(), grads)}

    def layers(self) -> Iterator[DecoderLayer]:
        """Each attention site with the Linears from its q/k/v projections up to the next site's (graph order)."""
        sites = self.attention_sites()
        starts = {p: s.layer for s in sites for p in s.projections}
        linears: dict[int, list[LinearSite]] = {s.layer: [] for s in sites}
        current = None
        for site in self.linear_sites():
            current = starts.get(site.module, current)
            if current is not None:
                linears[current].append(site)
        for s in sites:
            yield DecoderLayer(s.layer, s, tuple(linears[s.layer]))

    def reference_perplexity(self, windows: torch.Tensor, batch_size: int) -> float | None:
        """The perplexity as the model's own framework computes it: Hugging Face's ``labels=`` loss."""
        import math

        nll, count = 0.0, 0
        with torch.no_grad():
            for batch in batches(windows, batch_size, "eval reference"):
                loss = self.model(input_ids=batch, labels=batch, use_cache=False).loss
                n = batch[:, 1:].numel()
                nll += loss.item() * n
                count += n
        return math.exp(nll / count)

    def decoder(self, recipe: Recipe, verify: bool = True):
        """The lowered decoder for paged int8 decoding, or None and the reason it was skipped."""
        return compile_decoder(self.model, recipe, verify=verify)


class _Tap(torch.nn.Module):
    """Identity on a value; feeds it to an observer (or a saturation counter: anything with ``update``) as
    ``[tokens, channels]`` (attention values ``[B, H, S, D]`` with channel ``c = h * D + d``)."""

    def __init__(self, observer: Observer | SaturationCounter, attention: bool):
        super().__init__()
        self.observer, self.attention = observer, attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.transpose(1, 2).reshape(-1, x.shape[1] * x.shape[3]) if self.attention else x.reshape(-1, x.shape[-1])
        self.observer.update(flat)
        return x


class _ErrorTap(torch.nn.Module):
    """Identity on a Linear's output ``y``; keeps ``dy`` (its W8A8 output minus ``y``) and a zero leaf whose
    gradient is ``dL/dy``, for :meth:`TorchExportFrontend.loss_sensitivity`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, offset: torch.Tensor):
        super().__init__()
        self.weight_fq, self.bias = fake_quant_weight(weight.detach().float()), bias
        self.scale, self.offset = scale, offset
        self.dy = self.leaf = None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.dy = torch.nn.functional.linear(fake_quant(x, self.scale, self.offset), self.weight_fq, self.bias) - y
        self.leaf = torch.zeros_like(y, requires_grad=True)
        return y + self.leaf


def _param(gm: torch.nn.Module, name: str) -> torch.Tensor:
    """The parameter with module path ``name`` in an unlifted capture module."""
    return gm.get_parameter(WRAPPER_PREFIX + name)


def set_parameters(gm: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Put ``state_dict``'s values (module paths) in place of ``gm``'s parameters where they differ
    (new tensors are assigned; the old ones, which the input model may share, are never written)."""
    for name, value in state_dict.items():
        try:
            current = _param(gm, name)
        except AttributeError:
            continue  # a buffer, not a parameter
        if value is current:
            continue
        owner, _, leaf = (WRAPPER_PREFIX + name).rpartition(".")
        setattr(gm.get_submodule(owner), leaf, torch.nn.Parameter(value.detach(), requires_grad=False))
