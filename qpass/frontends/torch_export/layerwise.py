"""Layer-wise calibration: a Hugging Face directory read from its (sharded) safetensors one decoder layer at a time.

For models whose weights do not fit in memory (issue 13). :class:`LayerwiseFrontend` answers the part of the
:class:`qpass.core.frontend.Frontend` protocol that calibration and evaluation need (``attention_sites``, ``observe``,
``layers``, ``window_nll``),
so :func:`qpass.core.calibrate.calibrate` makes the recipe exactly as it does for the whole model
(:func:`~qpass.core.calibrate.calibrate_by_layer` the same recipe, each layer's ranges chosen when the layer is done):

- one decoder layer is captured with ``torch.export``: the model's own base model (``LlamaModel``, ...) built with
  one layer, fed hidden states ``[B, S, hidden]``, its final norm left out, so the causal or sliding-window masks
  and the rotary embeddings come from the model's own code as in the whole model; the attention site is found on
  that graph by the fx site finder (structure, not names), once per layer type, and repeated for every layer;
- per layer, that layer's tensors alone are read (``safe_open``, in the file's dtype) and put in place of the
  capture's parameters as float32 (the whole-model path computes in float32 too, so the statistics are the same);
- the calibration windows' hidden states (float32 ``[B, W, hidden]`` a batch) pass from layer to layer in one
  :class:`~qpass.core.spill.Spill`, replaced batch by batch; past ``hidden_budget`` bytes they go to ``.npy`` files in
  a temporary directory, removed when the run ends, however it ends;
- observers get q/k/v as ``[tokens, channels]`` (``c = h * head_dim + d``; K/V before GQA's repeat, after RoPE)
  and each Linear's input as ``[tokens, in_features]`` (W8A8; the Linears found on the capture by the fx finder),
  batch by batch, in the whole-model path's order; W8A8's weights are read again one at a time when looked up
  (:class:`LazyStateDict`);
- smoothing (``--anti-method``) runs each layer twice, as the whole-model path runs the model twice: with its
  float weights on the float model's hidden states, feeding the smoothing groups' observers, then with the groups'
  scales folded into its weights on the smoothed model's hidden states, feeding every other observer; both
  streams pass on (``observe_layers``' ``smooth``), so each run sees the inputs its whole-model run sees, to the bit;
- the quantized model runs layer by layer too (:meth:`LayerwiseFrontend.window_nll`): each layer's weights read once,
  quantized by the whole-model pass pipeline applied to the one-layer capture with that layer's part of the recipe
  (:func:`layer_recipe`), every window's hidden states passed on, then the final norm and the LM head. That is the
  evaluation (``--eval``), the saturation count on held-out windows, and ``--disable-level auto``'s trials.

The embedding is read first; the final norm and the LM head only by the streamed forward, after the last layer.
"""

import copy
import gc
import json
from collections.abc import Iterator, Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from torch.export import Dim

from qpass.core.data import check_window
from qpass.core.errors import QpassError
from qpass.core.evaluate import Score, batch_nll
from qpass.core.memory import hidden_budget, trim_heap
from qpass.core.naming import EMBEDDING, LM_HEAD, NORM, layer_key, layer_prefix
from qpass.core.observers import Observer
from qpass.core.recipe import SITE_KINDS, Recipe, geometry, key_smooth_key, linear_key, site_key
from qpass.core.sites import AttentionSite, DecoderLayer, LinearSite, SmoothGroup
from qpass.core.spill import Spill
from qpass.frontends.torch_export.capture import WRAPPER_PREFIX, param_names
from qpass.frontends.torch_export.frontend import TorchExportFrontend
from qpass.frontends.torch_export.pipeline import quantize_program
from qpass.models.loaders import (
    BROKEN_FILE,
    check_finite,
    check_layers,
    check_remote_code,
    check_vocabulary,
    load_config,
    load_tokenizer,
    rotary_frequencies,
)
from qpass.passes.fx.find_attention_sites import find_attention_sites
from qpass.passes.fx.find_linear_sites import find_linear_sites, find_smoothing_groups

# base models made of embed_tokens, layers.<i>, norm and rotary_emb, whose embedding is used unscaled
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
CAPTURE_PREFIX = "layers.0."  # the one layer's parameters in the capture (after the wrapper's prefix)
STREAM, FLOAT_STREAM = "hidden", "float"  # the hidden states passed on; the float model's, beside them when smoothing
WHOLE_MODEL_FACTOR = 2.0  # a whole-model compile holds about twice the float32 weights (model and capture)


class Checkpoint:
    """The tensors of a Hugging Face directory's safetensors files (one, or sharded with an index), by name,
    read only when asked for. ``read_names`` lists every tensor read, in order (what tests check)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path, self.read_names = path, []
        index = path / "model.safetensors.index.json"
        try:
            if index.is_file():
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                self.files = {name: path / file for name, file in weight_map.items()}
            else:
                self.files = {}
                for file in sorted(path.glob("*.safetensors")):
                    with safe_open(str(file), framework="pt") as f:
                        self.files.update(dict.fromkeys(f.keys(), file))
        except (*BROKEN_FILE, TypeError, AttributeError) as err:  # AttributeError: a weight_map that is not an object
            raise QpassError(
                f"MODEL {path}: cannot read its safetensors index ({type(err).__name__}: {err}); re-download the model"
            ) from None
        if not self.files:
            raise QpassError(
                f"MODEL {path}: no *.safetensors weights in this directory; "
                "layer-wise calibration reads safetensors only"
            )

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names``, each in its file's dtype (each file opened once)."""
        from safetensors import safe_open

        missing = [n for n in names if n not in self.files]
        if missing:
            raise QpassError(
                f"MODEL {self.path}: weight {missing[0]} is not in the safetensors files ({len(missing)} missing); "
                "the download is incomplete or the files belong to another model: re-download the model"
            )
        out = {}
        for file in dict.fromkeys(self.files[n] for n in names):
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in (n for n in names if self.files[n] == file):
                        out[name] = f.get_tensor(name)
                        self.read_names.append(name)
            except BROKEN_FILE as err:
                raise QpassError(
                    f"MODEL {self.path}: cannot read {file.name} ({type(err).__name__}: {err}); re-download the model"
                ) from None
        # as each layer is read: checking every weight before the run would read a model larger than memory twice
        check_finite(f"MODEL {self.path}", out.items())
        return out

    def sizes(self) -> tuple[int, int]:
        """``(elements, bytes)`` of every tensor, from the files' headers (no tensor is read)."""
        from safetensors import safe_open

        elements = nbytes = 0
        for file in dict.fromkeys(self.files.values()):
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    count = 1
                    for d in piece.get_shape():
                        count *= d
                    elements += count
                    nbytes += count * _itemsize(piece.get_dtype())
        return elements, nbytes


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}.get(
        dtype, 1
    )


def whole_model_memory(path: str | Path) -> int | None:
    """Bytes a whole-model compile of the directory ``path`` needs, about (float32 weights, held twice), or None
    when ``path`` is not a Hugging Face directory with safetensors."""
    path = Path(path)
    if not (path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))):
        return None
    try:
        elements, _ = Checkpoint(path).sizes()
    except (QpassError, TypeError, *BROKEN_FILE):  # TypeError: a shard name in the index that is not a string
        return None  # the whole-model loader names what is wrong with it
    return int(elements * 4 * WHOLE_MODEL_FACTOR)


class _OneLayer(torch.nn.Module):
    """``hidden [B, S, hidden] -> hidden [B, S, hidden]`` through one decoder layer: the model's base model built
    with one layer, no embedding and no final norm (``model`` is the name the capture wrapper gives it)."""

    def __init__(self, base: torch.nn.Module):
        super().__init__()
        self.model = base

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model(inputs_embeds=hidden, use_cache=False).last_hidden_state


class _Tap(torch.nn.Module):
    """Identity on a value; feeds ``observer`` (when set) an attention value ``[B, H, S, D]`` as ``[B * S, H * D]``,
    a Linear's input ``[..., C]`` as ``[tokens, C]`` (as the whole-model frontend's taps do)."""

    def __init__(self, attention: bool):
        super().__init__()
        self.attention, self.observer = attention, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            flat = (
                x.transpose(1, 2).reshape(-1, x.shape[1] * x.shape[3]) if self.attention else x.reshape(-1, x.shape[-1])
            )
            self.observer.update(flat)
        return x


class _LayerProgram:
    """One decoder layer captured (for one layer type), with taps after its q/k/v and its Linears' inputs; weights
    swapped per layer."""

    def __init__(
        self,
        exported: torch.export.ExportedProgram,
        gm: torch.fx.GraphModule,
        site: AttentionSite,
        linears: list[LinearSite],
        groups: list[SmoothGroup],
        taps: dict[str, _Tap],
    ):
        self.exported, self.gm, self.site, self.linears, self.groups, self.taps = (
            exported,
            gm,
            site,
            linears,
            groups,
            taps,
        )
        self.params = {name.removeprefix(WRAPPER_PREFIX): p for name, p in gm.named_parameters()}

    def quantized(self, layer: int, recipe, counters: dict | None = None) -> torch.nn.Module:
        """The layer, its weights loaded, quantized as ``recipe`` says for layer ``layer``: the whole-model pass
        pipeline run on the one-layer capture with :func:`layer_recipe`; ``counters`` (keyed ``(layer, kind)``, see
        :mod:`qpass.core.saturation`) are fed what that layer's first int8 Quantizes receive."""
        for key in self.exported.state_dict:  # the loaded layer's tensors (the same objects: nothing is copied)
            self.exported.state_dict[key] = self.params[key.removeprefix(WRAPPER_PREFIX)]
        program, _ = quantize_program(self.exported, [self.site], layer_recipe(recipe, layer, self.site), verify=False)
        mine = {(self.site.layer, kind): c for (at, kind), c in (counters or {}).items() if at == layer}
        return TorchExportFrontend.counting_logits(program, mine)

    def load(self, checkpoint: Checkpoint, layer: int) -> None:
        """Put layer ``layer``'s tensors (read from ``checkpoint``) in place of the parameters, as float32."""
        names = self._stored_names(layer)
        tensors = checkpoint.read(list(names))
        for stored, name in names.items():
            value = tensors.pop(stored)
            if tuple(value.shape) != tuple(self.params[name].shape):
                raise QpassError(
                    f"MODEL {checkpoint.path}: weight {stored} is {list(value.shape)} but config.json makes it "
                    f"{list(self.params[name].shape)}; repair config.json or re-download the model"
                )
            self._set(name, value.to(torch.float32))
            del value

    def replace(self, layer: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Put ``tensors`` (``model.layers.<layer>...`` names, e.g. smoothed weights) in place of the loaded ones."""
        names = self._stored_names(layer)
        for stored, value in tensors.items():
            self._set(names[stored], value.detach().to(torch.float32))

    def release(self) -> None:
        """Drop the weights of the layer last loaded (empty tensors of the same shapes take their place)."""
        for name, p in self.params.items():
            self._set(name, torch.empty(p.shape, device="meta"))
        for key, value in self.exported.state_dict.items():
            self.exported.state_dict[key] = torch.empty(value.shape, device="meta")

    def _stored_names(self, layer: int) -> dict[str, str]:
        """The checkpoint's name of each parameter for layer ``layer`` -> the capture's name."""
        return {layer_prefix(layer) + name.removeprefix(CAPTURE_PREFIX): name for name in self.params}

    def _set(self, name: str, value: torch.Tensor) -> None:
        owner, _, leaf = (WRAPPER_PREFIX + name).rpartition(".")
        param = torch.nn.Parameter(value, requires_grad=False)
        setattr(self.gm.get_submodule(owner), leaf, param)
        self.params[name] = param


class LayerwiseFrontend:
    """A Hugging Face causal LM in a directory, calibrated one decoder layer at a time over ``[batch, window]``
    token ids.

    ``hidden_budget``: bytes the calibration windows' hidden states may take in memory before they are spilled to
    a temporary file (default: a quarter of the memory available when calibration starts)."""

    layerwise = True  # the mode: one decoder layer at a time

    def __init__(self, path: str | Path, window: int, hidden_budget: int | None = None):
        path = Path(path)
        if not (path.is_dir() and (path / "config.json").is_file()):
            raise QpassError(
                f"--layerwise: MODEL {path} is not a Hugging Face model directory (config.json + *.safetensors); "
                "layer-wise calibration reads such a directory only"
            )
        try:
            doc = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise QpassError(
                f"MODEL {path}: config.json is not valid JSON ({err}); repair or re-download the model"
            ) from None
        check_remote_code(f"MODEL {path}", doc if isinstance(doc, dict) else {})
        model_type = doc.get("model_type") if isinstance(doc, dict) else None
        if model_type not in ARCHITECTURES:
            raise QpassError(
                f"--layerwise: model_type {model_type!r} is not one layer-wise calibration supports yet "
                f"({', '.join(ARCHITECTURES)}); drop --layerwise to compile the whole model"
            )
        self.config = load_config(path, f"MODEL {path}")
        self.tokenizer = load_tokenizer(path, f"MODEL {path}", "check the tokenizer files")
        check_vocabulary(f"MODEL {path}", self.tokenizer, getattr(self.config, "vocab_size", None))
        check_window(window, getattr(self.config, "max_position_embeddings", None), path.name)
        self.path, self.window, self.hidden_budget = path, window, hidden_budget
        self.name, self.source = path.name, str(path)
        self.checkpoint = Checkpoint(path)
        check_layers(f"MODEL {path}", self.checkpoint.files, self.num_layers)
        self.spilled: str | None = None  # the temporary directory the last run spilled to (removed since)
        self._programs: dict[str, _LayerProgram] = {}
        self._sites: list[AttentionSite] | None = None
        self._norm: torch.nn.Module | None = None  # the model's final norm, on meta until the streamed forward runs

    @classmethod
    def load(cls, spec: str | Path, window: int, hidden_budget: int | None = None) -> "LayerwiseFrontend":
        return cls(spec, window, hidden_budget)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def layer_type(self, layer: int) -> str:
        """The attention type of ``layer`` (``full_attention``, ``sliding_attention``) where the config lists them."""
        types = getattr(self.config, "layer_types", None)
        return types[layer] if types else "all"

    def _program(self, layer: int) -> _LayerProgram:
        """The capture of ``layer``'s type (made on the first layer of that type)."""
        kind = self.layer_type(layer)
        if kind not in self._programs:
            self._programs[kind] = self._capture(layer)
        return self._programs[kind]

    def _base(self, layer: int) -> torch.nn.Module:
        """The base model of ``layer`` alone (its config with one layer of ``layer``'s type), on the meta device but
        for its rotary embedding, whose ``inv_freq`` is computed."""
        from transformers import AutoModel

        config = copy.deepcopy(self.config)
        config.num_hidden_layers = 1
        if getattr(config, "layer_types", None):
            config.layer_types = [self.config.layer_types[layer]]
        with torch.device("meta"):
            base = AutoModel.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
        base.rotary_emb = type(base.rotary_emb)(config=config)  # its inv_freq computed, not left on meta
        return base

    def _capture(self, layer: int) -> _LayerProgram:
        base = self._base(layer)
        norm, base.embed_tokens, base.norm = base.norm, torch.nn.Identity(), torch.nn.Identity()
        base.layers[0].to_empty(device="cpu")  # tracing needs shapes, not values: the weights are read per layer later
        example = torch.zeros((2, self.window, self.config.hidden_size))
        try:
            with torch.no_grad():
                program = torch.export.export(
                    _OneLayer(base), (example,), dynamic_shapes=({0: Dim("batch", min=1, max=1024)},), strict=False
                )
        except Exception as err:  # torch.export raises many types; the user needs to know capture failed
            raise QpassError(
                f"--layerwise: torch.export could not trace one decoder layer of {self.name} ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); drop --layerwise to compile the whole model"
            ) from err
        sites = find_attention_sites(program.graph, param_names(program))
        if len(sites) != 1:
            raise QpassError(
                f"--layerwise: one decoder layer of {self.name} holds {len(sites)} attention sites, not 1; "
                "drop --layerwise to compile the whole model"
            )
        linears = find_linear_sites(program.graph, param_names(program))
        groups = find_smoothing_groups(program.graph, linears, param_names(program))
        if self._norm is None:  # the final norm, for the streamed forward's logits (its weight read when it runs)
            self._norm = norm
        gm = program.module()
        del base
        nodes, taps = {n.name: n for n in gm.graph.nodes}, {}
        values = [(getattr(sites[0], kind), True) for kind in ("q", "k", "v")]
        values += [(name, False) for name in dict.fromkeys([*(s.input for s in linears), *(g.input for g in groups)])]
        for i, (value, attention) in enumerate(values):
            taps[value] = _Tap(attention)
            gm.add_submodule(f"qpass_tap_{i}", taps[value])
            with gm.graph.inserting_after(nodes[value]):
                gm.graph.call_module(f"qpass_tap_{i}", (nodes[value],))
        gm.recompile()
        result = _LayerProgram(program, gm, sites[0], linears, groups, taps)
        result.release()
        return result

    def attention_sites(self) -> list[AttentionSite]:
        """Each layer's site: its layer type's capture renamed to the layer (values ``layers.<i>.<node>``, module
        paths ``model.layers.<i>...``)."""
        if self._sites is None:
            self._sites = [self._site(i) for i in range(self.num_layers)]
        return self._sites

    def _site(self, layer: int) -> AttentionSite:
        template, module = self._program(layer).site, _module_path(layer)
        return replace(
            template,
            layer=layer,
            attention=layer_key(layer, template.attention),
            q=layer_key(layer, template.q),
            k=layer_key(layer, template.k),
            v=layer_key(layer, template.v),
            q_from=module(template.q_from),
            k_from=module(template.k_from),
            v_from=module(template.v_from),
            prefix=module(template.prefix) if template.prefix else "",
        )

    def linear_sites(self) -> list[LinearSite]:
        """Each layer's Linears (found on its layer type's capture by the fx finder), renamed to the layer."""
        return [s for layer in self.layers() for s in layer.linears]

    def layers(self) -> Iterator[DecoderLayer]:
        """The decoder layers in order, each with its attention site and Linears."""
        for site in self.attention_sites():
            module, named = _module_path(site.layer), partial(layer_key, site.layer)
            linears = tuple(
                replace(
                    s,
                    node=named(s.node),
                    input=named(s.input),
                    weight=named(s.weight),
                    bias=None if s.bias is None else named(s.bias),
                    module=module(s.module),
                )
                for s in self._program(site.layer).linears
            )
            yield DecoderLayer(site.layer, site, linears)

    def smoothing_groups(self, linears: list[LinearSite] | None = None) -> list[SmoothGroup]:
        """Each layer's smoothing groups (found on its layer type's capture), renamed to the layer, in layer order."""
        out = []
        for layer in range(self.num_layers):
            module, named = _module_path(layer), partial(layer_key, layer)
            out += [
                replace(g, input=named(g.input), prev=module(g.prev), consumers=tuple(module(c) for c in g.consumers))
                for g in self._program(layer).groups
            ]
        return out

    def state_dict(self) -> "LazyStateDict":
        """The float parameters by module path, each read (as float32) only when it is looked up."""
        return LazyStateDict(self.checkpoint)

    def observe(
        self,
        windows: torch.Tensor,
        observers: dict[str, Observer],
        batch_size: int,
        state_dict: dict | None = None,
        desc: str = "calibrate",
    ) -> None:
        """Run ``windows [N, W]`` through the layers one at a time, feeding each site's q/k/v (and each Linear's input)
        to the observer keyed by it."""
        if state_dict is not None:
            raise QpassError(
                "--layerwise: a whole-model smoothed state dict cannot be streamed; smoothing layer-wise goes "
                "through calibrate_by_layer"
            )
        for _ in self.observe_layers(windows, observers, batch_size, desc):
            pass

    def observe_layers(
        self,
        windows: torch.Tensor,
        observers: dict[str, Observer],
        batch_size: int,
        desc: str = "calibrate",
        smooth=None,
    ) -> Iterator[int]:
        """:meth:`observe`, yielding each layer's index once its observers have seen every window (for
        :func:`qpass.core.calibrate.calibrate_by_layer`, which then drops them).

        ``smooth(layer, peek)``, when given, is called with each layer's float weights loaded; ``peek(observers)`` runs
        every window of the float model's own hidden states through the layer, feeding ``observers`` (keyed as
        ``observers`` are). The tensors it returns (``model.layers.<layer>...`` names) replace the layer's before the
        run that feeds ``observers`` and passes the smoothed model's hidden states on.

        With ``smooth``, two streams of hidden states pass from layer to layer, as the whole-model path's two runs
        see them: the float model's (what its smoothing run observes) and the smoothed model's (its calibration
        run). Smoothing leaves the float function unchanged only up to rounding, and a search over smoothing
        exponents can turn on a difference that small (SmolLM2: two of m3's candidates 9e-5 apart, flipped by
        hidden states 1e-6 apart), so the layers after are given the same inputs as the whole model's."""
        from tqdm.auto import tqdm

        with Spill(hidden_budget(self.hidden_budget)) as hidden:
            self._embed(windows, hidden, batch_size)
            if smooth is not None:
                for b in range(_count(windows, batch_size)):
                    hidden.put(FLOAT_STREAM, b, hidden.tensor(STREAM, b).clone())
            self.spilled = hidden.directory
            for site in tqdm(
                self.attention_sites(), desc=f"{desc} (layer-wise)", unit="layer", leave=False, disable=None
            ):
                program = self._program(site.layer)
                program.load(self.checkpoint, site.layer)
                try:
                    if smooth is not None:
                        advanced = []

                        def peek(peeked: dict[str, Observer]) -> None:
                            _run(program, site.layer, peeked, hidden, FLOAT_STREAM, not advanced)
                            advanced.append(True)

                        replacement = smooth(site.layer, peek)
                        if not advanced:  # a layer with nothing to smooth: the float stream still moves on
                            _run(program, site.layer, {}, hidden, FLOAT_STREAM, True)
                        program.replace(site.layer, replacement)
                    _run(program, site.layer, observers, hidden, STREAM, True)
                finally:
                    program.release()
                    trim_heap()
                self.spilled = hidden.directory
                yield site.layer

    def window_nll(
        self,
        recipe: Recipe | None,
        windows: torch.Tensor,
        batch_size: int,
        desc: str = "eval",
        counters: dict | None = None,
        program=None,
        score: Score | None = None,
    ) -> torch.Tensor:
        """The mean next-token NLL (or ``score``) of each of ``windows [N, W]`` (float64 ``[N]``, as
        :func:`qpass.core.evaluate.window_nll` gives it) for the float model (``recipe`` None) or the model quantized
        as ``recipe`` says, run one decoder layer at a time over every window: each layer's weights are read once,
        quantized by the whole-model pass pipeline on the one-layer capture (smoothing folded in, Q/DQ, W8A8), and the
        hidden states pass on as calibration's do (spilled past the budget); then the final norm and the LM head, a
        batch at a time. ``counters`` (:func:`qpass.core.saturation.counters`) count each layer's saturation.
        ``program`` is what :meth:`apply` returned: None, as no whole program is built."""
        from tqdm.auto import tqdm

        with Spill(hidden_budget(self.hidden_budget)) as hidden:
            self._embed(windows, hidden, batch_size)
            for layer in tqdm(
                range(self.num_layers), desc=f"{desc} (layer-wise)", unit="layer", leave=False, disable=None
            ):
                program = self._program(layer)
                program.load(self.checkpoint, layer)
                try:
                    module = program.gm if recipe is None else program.quantized(layer, recipe, counters)
                    with torch.no_grad():
                        for b in range(_count(windows, batch_size)):
                            hidden.put(STREAM, b, module(hidden.tensor(STREAM, b)))
                    del module
                finally:
                    program.release()
                    gc.collect()  # the quantized program's fx graph holds reference cycles, and with them its weights
                    trim_heap()
            return self._head_nll(windows, hidden, batch_size, score or batch_nll)

    def _embed(self, windows: torch.Tensor, hidden: Spill, batch_size: int) -> None:
        """``hidden``'s stream, batch by batch: the embedding of ``windows``, as float32 ``[B, W, hidden]`` (the
        embedding read, used and dropped)."""
        embedding = self.checkpoint.read([EMBEDDING])[EMBEDDING]
        for b, batch in enumerate(windows.split(batch_size)):
            hidden.put(STREAM, b, torch.nn.functional.embedding(batch, embedding).float())

    def _head_nll(self, windows: torch.Tensor, hidden: Spill, batch_size: int, score: Score) -> torch.Tensor:
        """Per-window NLL (``score``) from the last layer's hidden states: the final norm, the LM head (the embedding
        where the config ties them), the next-token cross-entropy."""
        head_name = EMBEDDING if getattr(self.config, "tie_word_embeddings", False) else LM_HEAD
        norm = self._norm.to_empty(device="cpu")
        try:
            with torch.no_grad():
                norm.weight.copy_(self.checkpoint.read([NORM])[NORM].float())
                head = self.checkpoint.read([head_name])[head_name].float()
                out = [
                    score(torch.nn.functional.linear(norm(hidden.tensor(STREAM, b)), head), batch, b)
                    for b, batch in enumerate(windows.split(batch_size))
                ]
        finally:
            self._norm = norm.to(device="meta")
        return torch.cat(out)

    def loss_sensitivity(self, recipe, linears: list[LinearSite], windows: torch.Tensor) -> None:
        """None: a backward pass needs the whole model (``auto`` ranks by output SQNR alone, layer-wise)."""
        return None

    def num_parameters(self) -> int:
        """Parameters in the safetensors files (a tied LM head once: it is not stored)."""
        return self.checkpoint.sizes()[0]

    def config_json(self) -> dict:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        config = self.config.to_dict()
        if not config.get("architectures"):
            config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[self.config.model_type]]
        return config

    def model_facts(self) -> dict:
        return {"frontend": "torch.export", "layerwise": True}

    def check_config(self, config) -> None:
        """Every policy runs layer by layer."""

    def apply(self, recipe: Recipe, verify: bool = True) -> tuple[None, dict]:
        """No whole program: each layer is quantized when it runs (:meth:`window_nll`), and the exporters read the
        checkpoint one layer at a time."""
        return None, {}

    def decoder(self, recipe: Recipe, verify: bool = True) -> tuple[None, dict]:
        return None, {"skipped": "layer-wise compile: the recipe only"}

    def reference_perplexity(self, windows: torch.Tensor, batch_size: int) -> None:
        """None: the model's own framework would hold the whole model."""
        return None

    def extra_files(self, recipe) -> dict[str, str]:
        return {}

    def rotary(self) -> torch.Tensor | None:
        """The rotary embedding's frequencies, built as each layer's capture builds it (:meth:`_base`)."""
        return rotary_frequencies(self._base(0).rotary_emb, self.config)


def _run(
    program: _LayerProgram, layer: int, observers: dict[str, Observer], hidden: Spill, stream: str, advance: bool
) -> None:
    """Every batch of ``hidden``'s ``stream`` through ``program`` (layer ``layer``'s weights loaded), feeding the
    observers keyed ``layers.<layer>.<value>``; ``advance`` puts the outputs in their place (the next layer's
    inputs)."""
    for value, tap in program.taps.items():
        tap.observer = observers.get(layer_key(layer, value))
    try:
        with torch.no_grad():
            for b in sorted(hidden.values[stream]):
                out = program.gm(hidden.tensor(stream, b))
                if advance:
                    hidden.put(stream, b, out)
    finally:
        for tap in program.taps.values():
            tap.observer = None


def layer_recipe(recipe, layer: int, site: AttentionSite):
    """The part of ``recipe`` that concerns decoder layer ``layer``, renamed for the one-layer capture whose attention
    site is ``site`` (layer 0, module paths ``layers.0...``): its attention site's scales, its Linears' input qparams
    and float Linears, its smoothing groups (keeping their scale names) and its key smoothing."""
    ours = layer_prefix(layer)

    def to_capture(name: str) -> str:
        return CAPTURE_PREFIX + name.removeprefix(ours)

    tensors = {
        site_key(site.layer, kind, part): t
        for kind in SITE_KINDS
        for part in ("scale", "offset")
        if (t := recipe.tensors.get(site_key(layer, kind, part))) is not None
    }
    if (key := recipe.tensors.get(key_smooth_key(layer))) is not None:  # folded by the site's own projections
        tensors[key_smooth_key(site.layer)] = key
    groups = [
        {**g, "prev": to_capture(g["prev"]), "consumers": [to_capture(c) for c in g["consumers"]]}
        for g in recipe.w8a8.get("smooth", [])
        if g["prev"].startswith(ours)
    ]
    tensors.update({g["scale"]: recipe.tensors[g["scale"]] for g in groups})
    for module in {
        m
        for m in (k.removeprefix("w8a8.").rsplit(".input_", 1)[0] for k in recipe.tensors if k.startswith("w8a8."))
        if m.startswith(ours)
    }:
        for part in ("scale", "offset"):
            tensors[linear_key(to_capture(module), part)] = recipe.tensors[linear_key(module, part)]

    def mine(table: dict) -> dict:  # this layer's Linears of a module path -> reason table, by capture name
        return {to_capture(m): why for m, why in table.items() if m.startswith(ours)}

    w8a8 = dict(recipe.w8a8)
    if w8a8:
        w8a8.update(smooth=groups, float_linears=mine(recipe.float_linears))
    if "dynamic_linears" in w8a8:  # static W8A8's Linears with per-token activations
        w8a8["dynamic_linears"] = mine(w8a8["dynamic_linears"])
    if "linears" in w8a8:  # dynamic W8A8: the Linears by name, no qparams
        w8a8["linears"] = [to_capture(m) for m in w8a8["linears"] if m.startswith(ours)]
    return Recipe(recipe.config, geometry([site]), tensors, {}, w8a8)


def _module_path(layer: int):
    """``layers.0.self_attn...`` (the capture's module paths) -> ``model.layers.<layer>.self_attn...``."""

    def module(name: str) -> str:
        return layer_prefix(layer) + name.removeprefix(CAPTURE_PREFIX) if name.startswith(CAPTURE_PREFIX) else name

    return module


class LazyStateDict(Mapping):
    """A checkpoint's tensors by name, each read from its file as float32 when looked up (none kept)."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.checkpoint.files:
            raise KeyError(name)
        return self.checkpoint.read([name])[name].to(torch.float32)

    def __contains__(self, name) -> bool:  # without reading the tensor (Mapping's would)
        return name in self.checkpoint.files

    def __iter__(self):
        return iter(self.checkpoint.files)

    def __len__(self) -> int:
        return len(self.checkpoint.files)


def _count(windows: torch.Tensor, batch_size: int) -> int:
    """How many batches of ``batch_size`` windows ``windows [N, W]`` make."""
    return -(-windows.shape[0] // batch_size)
