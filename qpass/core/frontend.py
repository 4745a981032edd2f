"""The protocol every frontend implements, so that calibration, evaluation and export need no IR.

A frontend holds one model in its IR (a ``torch.export`` program, an ONNX graph). Everything the
core asks of it is here; how it answers (taps, passes, sessions) is its own business.

Each frontend offers two modes, chosen when it is opened (:mod:`qpass.frontends`): the whole model at once, or
one decoder layer at a time (``layerwise``) for models larger than memory. What a mode can do:

=====================================  ===========  ==================================================
                                       whole model  layer-wise
=====================================  ===========  ==================================================
perplexity with saturation counters    yes          yes (:meth:`Frontend.window_nll`, streamed)
the model's own reference perplexity   yes          no (None)
a whole quantized program (``apply``)  yes          ONNX yes; torch.export no (None: the recipe only)
a decoder for generation               torch.export no
``observe_layers`` (layer by layer)    no           yes
loss sensitivity (backward pass)       torch.export no (None)
=====================================  ===========  ==================================================
"""

from collections.abc import Callable, Iterator
from typing import Protocol

import torch

from qpass.core.evaluate import Score
from qpass.core.observers import Observer
from qpass.core.recipe import Recipe
from qpass.core.saturation import SaturationCounter
from qpass.core.sites import AttentionSite, DecoderLayer, LinearSite, SmoothGroup

Logits = Callable[[torch.Tensor], torch.Tensor]  # token ids [B, S] -> logits [B, S, vocab]


class Frontend(Protocol):
    name: str  # the model's name, for the report
    source: str  # where it was loaded from
    tokenizer: object
    layerwise: bool  # the mode: one decoder layer at a time
    spilled: bool  # layer-wise: whether the last run kept values passed between layers in temporary files

    def check_config(self, config) -> None:
        """Refuse, before calibrating, a policy this frontend cannot apply to this model (QpassError, one line)."""

    def num_parameters(self) -> int:
        """How many parameters the float model has (tied ones once)."""

    def config_json(self) -> dict:
        """The model's configuration as its ``config.json`` holds it, ``architectures`` set (for exporters)."""

    def model_facts(self) -> dict:
        """What the report says of the input beyond its geometry (at least ``frontend``: its name)."""

    def extra_files(self, recipe: Recipe) -> dict[str, str]:
        """Text files the output carries over from the input, by file name (an ONNX model's ``genai_config.json``)."""

    def rotary(self) -> torch.Tensor | None:
        """The RoPE frequency of each channel pair ``[r / 2]`` in the rotate-half layout (channel ``d`` turns with
        ``d + r/2``), for ranges of q and k after RoPE that must hold beyond the calibration window
        (``--max-context``); None where the frontend cannot read them (no RoPE, several, or frequencies that change at
        run time)."""

    def attention_sites(self) -> list[AttentionSite]:
        """Every attention site, in execution order (raises QpassError when there is none)."""

    def linear_sites(self) -> list[LinearSite]:
        """The Linears W8A8 would quantize (the LM head left out)."""

    def smoothing_groups(self, linears: list[LinearSite]) -> list[SmoothGroup]:
        """The groups among ``linears`` whose shared input can be smoothed."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The float parameters by module path (``model.layers.0.self_attn.q_proj.weight``)."""

    def observe(
        self,
        windows: torch.Tensor,
        observers: dict[str, Observer],
        batch_size: int,
        state_dict: dict[str, torch.Tensor] | None = None,
        desc: str = "calibrate",
    ) -> None:
        """Run the float model over ``windows [N, W]`` (with ``state_dict``'s values in place of its own
        parameters, when given) and feed each observer the value it is keyed by (a site's ``q``/``k``/``v``
        or a Linear's ``input``) as ``[tokens, channels]``."""

    def observe_layers(
        self,
        windows: torch.Tensor,
        observers: dict[str, Observer],
        batch_size: int,
        desc: str = "calibrate",
        smooth=None,
    ) -> Iterator[int]:
        """Layer-wise modes only: :meth:`observe`, yielding each decoder layer's index once its observers have seen
        every window (so :func:`qpass.core.calibrate.calibrate_by_layer` chooses its ranges and drops them).
        ``smooth(layer, peek)``, where the frontend can smooth layer by layer, returns the smoothed tensors of each
        layer after ``peek(observers)`` has run the float model's hidden states through it."""

    def apply(self, recipe: Recipe, verify: bool = True) -> tuple[object | None, dict[str, int]]:
        """The model quantized as ``recipe`` says, through the frontend's own pass pipeline (verified after
        each pass when ``verify``): ``(the quantized model in the frontend's IR, each pass's count)``; None for
        the model where a layer-wise mode builds no whole program."""

    def logits(self, recipe: Recipe | None = None, verify: bool = True) -> Logits:
        """The float model's logits function, or that of the model quantized as ``recipe`` says."""

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
        """The mean next-token NLL of each of ``windows [N, W]`` (float64 ``[N]``), float (``recipe`` None) or quantized
        as ``recipe`` says (``program``: what :meth:`apply` returned for it, if the caller has it), feeding each
        saturation counter keyed ``(layer, kind)`` the values the first int8 Quantize on that site's q/k/v receives,
        ``[tokens, channels]``; ``score`` instead of the NLL where given (:class:`qpass.core.evaluate.Divergence`:
        the `auto` fallback's). Evaluation, saturation and the `auto` fallback all measure through it."""

    def reference_perplexity(self, windows: torch.Tensor, batch_size: int) -> float | None:
        """The float model's perplexity as its own framework computes it (the ground truth for ``window_nll``);
        None where the mode cannot run the whole model."""

    def decoder(self, recipe: Recipe, verify: bool = True) -> tuple[object | None, dict]:
        """The model lowered for token-by-token decoding on the int8 cache, or None and why it was skipped."""

    def loss_sensitivity(
        self, recipe: Recipe, linears: list[LinearSite], windows: torch.Tensor
    ) -> dict[str, float] | None:
        """Per Linear, the first-order loss change of its W8A8 error; None when the frontend cannot take gradients."""

    def layers(self) -> Iterator[DecoderLayer]:
        """The decoder layers in order, each with its attention site and Linears (for layer-wise work)."""
