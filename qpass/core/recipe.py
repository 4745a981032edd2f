"""The calibrated result, frontend-neutral: per site, scales and offsets, plus the config that made them.

Saved as ``recipe.safetensors`` (the tensors) and ``recipe.json`` (config, sites, the axes of every
tensor, statistics), so calibration and compilation can run apart and one calibration feeds every
exporter. Tensor names (built only by the functions below), all float32, with their axes:

    layers.<i>.fa_q.scale / .offset     [heads, head_dim]          FAQuant Q
    layers.<i>.fa_k.scale / .offset     [kv_heads, head_dim]       FAQuant K
    layers.<i>.fa_v.scale / .offset     [kv_heads, head_dim]       FAQuant V
    layers.<i>.kv_k.scale / .offset     [kv_heads * head_dim]      C8 K, per channel (c = h * head_dim + d)
    layers.<i>.kv_v.scale / .offset     [kv_heads * head_dim]      C8 V
    w8a8.<linear>.input_scale / .input_offset  [tensor]            W8A8 activation qparams of a quantized Linear
                                                                   (``<linear>`` its module path)
    smooth.<i>.scale                    [channels]                 smoothing group i (qpass/core/smoothing.py)
    layers.<i>.key_smooth.scale         [kv_heads * head_dim]      key smoothing of the dynamic cache: K divided by it,
                                                                   Q multiplied (qpass/core/smoothing.py)

Offsets follow ``q = clamp(round(x / scale) + offset)``, ``x = (q - offset) * scale``.

With W8A8 the JSON has a ``w8a8`` object: ``act_method``, ``anti_method``, ``alpha``,
``disable_level``, ``smooth`` (the smoothing groups) and ``float_linears`` (module path -> why it
stays float). Linears not listed there are quantized. Static W8A8 may also have ``dynamic_linears`` (module path ->
why): Linears whose activations are quantized per token at run time instead of with calibrated qparams (the ``auto``
search's second step, :mod:`qpass.core.fallback`); they have no ``w8a8.<linear>.*`` tensors. Dynamic W8A8
(``config.w8a8 == "dynamic"``) has no ``w8a8.<linear>.*`` tensors (each token's scale is computed at run time); its
``w8a8`` object lists the Linears found under ``linears`` instead.
"""

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType

import torch

from qpass.core.config import QuantConfig
from qpass.core.errors import QpassError
from qpass.core.naming import layer_key

FORMAT_VERSION = 2  # recipe.json: version 2 added the axes of every tensor and the sites' module names
TENSORS_VERSION = 1  # recipe.safetensors: its names and layout are unchanged since version 1
TENSORS_FILE = "recipe.safetensors"
JSON_FILE = "recipe.json"
SITE_KINDS = ("fa_q", "fa_k", "fa_v", "kv_k", "kv_v")
AXES = {
    "fa_q": ("heads", "head_dim"),
    "fa_k": ("kv_heads", "head_dim"),
    "fa_v": ("kv_heads", "head_dim"),
    "kv_k": ("kv_heads * head_dim",),
    "kv_v": ("kv_heads * head_dim",),
    "input": ("tensor",),
    "smooth": ("channels",),
    "key_smooth": ("kv_heads * head_dim",),
}
_SITE_KEY = re.compile(r"layers\.\d+\.(fa_[qkv]|kv_[kv])\.(scale|offset)")
_LINEAR_KEY = re.compile(r"w8a8\.(.+)\.input_(scale|offset)")
_SMOOTH_KEY = re.compile(r"smooth\.\d+\.scale")
_KEY_SMOOTH = re.compile(r"layers\.(\d+)\.key_smooth\.scale")


CALIBRATED_WITH = "calibrated_with"  # stats entry: the run settings calibration ran with (window, windows)


def site_key(layer: int, kind: str, part: str) -> str:
    """``layers.<layer>.<kind>.<part>``: kind in ``SITE_KINDS``, part ``scale`` or ``offset``."""
    return layer_key(layer, f"{kind}.{part}")


def linear_key(module: str, part: str) -> str:
    """``w8a8.<module>.input_<part>``: part ``scale`` or ``offset``."""
    return f"w8a8.{module}.input_{part}"


def smooth_key(group: int) -> str:
    return f"smooth.{group}.scale"


def key_smooth_key(layer: int) -> str:
    """``layers.<layer>.key_smooth.scale``: the key smoothing of that layer's attention (the dynamic cache)."""
    return layer_key(layer, "key_smooth.scale")


def axes(name: str) -> tuple[str, ...]:
    """The axes of recipe tensor ``name`` (its granularity)."""
    if m := _SITE_KEY.fullmatch(name):
        return AXES[m.group(1)]
    if _LINEAR_KEY.fullmatch(name):
        return AXES["input"]
    if _SMOOTH_KEY.fullmatch(name):
        return AXES["smooth"]
    if _KEY_SMOOTH.fullmatch(name):
        return AXES["key_smooth"]
    raise QpassError(f"recipe: tensor {name} is not one a recipe holds; recalibrate with this qpass")


def check_tensor(name: str, tensor: torch.Tensor) -> None:
    """Refuse a recipe tensor no artefact may carry: a scale that is not finite and positive, an attention
    site's scale that is 1.0 in every channel (what a calibration that saw nothing leaves: calibration itself
    refuses a site whose values were all 0), an offset that is not a finite number within the int8 range, or a
    shape that does not fit its axes."""
    kind = axes(name)
    if tensor.dim() != len(kind):
        raise QpassError(f"recipe: {name} has shape {list(tensor.shape)}, but its axes are {list(kind)}; recalibrate")
    t = tensor.double()
    if name.endswith("offset"):
        if not (torch.isfinite(t).all() and ((t >= -128) & (t <= 127)).all()):
            raise QpassError(f"recipe: {name} has an offset that is not a finite number in [-128, 127]; recalibrate")
    elif not (torch.isfinite(t).all() and (t > 0).all()):
        bad = "NaN" if t.isnan().any() else "infinite" if t.isinf().any() else "zero or negative"
        raise QpassError(f"recipe: {name} has a scale that is {bad}; recalibrate (a scale must be finite and positive)")
    elif _SITE_KEY.fullmatch(name) and t.numel() > 1 and bool((t == 1.0).all()):
        raise QpassError(
            f"recipe: {name} is 1.0 in every channel, the value a calibration that saw no data leaves; "
            "recalibrate, with calibration text that reaches this layer"
        )


@dataclass(frozen=True)
class SiteGeometry:
    """What a recipe keeps of an attention site: its geometry and its module names (for exporters)."""

    layer: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    prefix: str = ""  # attention module path, "" when the graph has none
    projections: tuple[str, str, str] = ("", "", "")  # q, k, v projection module paths


def geometry(sites) -> tuple[SiteGeometry, ...]:
    """The :class:`SiteGeometry` of each :class:`~qpass.core.sites.AttentionSite`."""
    return tuple(SiteGeometry(s.layer, s.num_heads, s.num_kv_heads, s.head_dim, s.prefix, s.projections) for s in sites)


def key_smoothing_groups(sites, tensors) -> list[dict]:
    """The key smoothing groups (:mod:`qpass.core.smoothing`, ``prev_kind = "key"``) of the sites of ``sites`` with a
    ``layers.<i>.key_smooth.scale`` in ``tensors``: the k projection divided, the q projection multiplied."""
    groups = []
    for site in sites:
        name = key_smooth_key(site.layer)
        if name in tensors:
            q, k, _ = site.projections
            groups.append(
                {
                    "scale": name,
                    "prev": k,
                    "prev_kind": "key",
                    "consumers": [q],
                    "group": site.num_heads // site.num_kv_heads,
                    "head_dim": site.head_dim,
                }
            )
    return groups


@dataclass(frozen=True)
class Recipe:
    """Frozen: built once by calibration (or loaded), then only read."""

    config: QuantConfig
    sites: tuple[SiteGeometry, ...]
    tensors: MappingProxyType = field(default_factory=dict)
    stats: MappingProxyType = field(default_factory=dict)  # per-site SQNR and the like, for the report
    w8a8: MappingProxyType = field(default_factory=dict)  # W8A8 policy and smoothing groups; {} without W8A8

    def __post_init__(self):
        object.__setattr__(self, "sites", tuple(self.sites))
        for name in ("tensors", "stats", "w8a8"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
        for name, tensor in self.tensors.items():
            check_tensor(name, tensor)

    def get(self, layer: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, offset)`` of ``kind`` (``fa_q``, ``fa_k``, ``fa_v``, ``kv_k``, ``kv_v``) at ``layer``."""
        try:
            return self.tensors[site_key(layer, kind, "scale")], self.tensors[site_key(layer, kind, "offset")]
        except KeyError:
            raise QpassError(
                f"recipe: no {site_key(layer, kind, 'scale')}/.offset; recalibrate with the options "
                "this compile asks for"
            ) from None

    def linear(self, module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """W8A8 ``(input_scale [1], input_offset [1])`` of ``module``, None when it has none."""
        scale = self.tensors.get(linear_key(module, "scale"))
        return None if scale is None else (scale, self.tensors[linear_key(module, "offset")])

    @property
    def float_linears(self) -> dict[str, str]:
        return dict(self.w8a8.get("float_linears", {}))

    @property
    def dynamic_linears(self) -> dict[str, str]:
        """The Linears quantized with per-token activations (module path -> why): every one under dynamic W8A8, the
        ``w8a8.dynamic_linears`` of a static recipe."""
        if self.config.w8a8 == "dynamic":
            return dict.fromkeys(self.w8a8_linears(), "--w8a8 dynamic")
        return dict(self.w8a8.get("dynamic_linears", {}))

    def activations(self, module: str) -> str | None:
        """How W8A8 quantizes ``module``'s input: ``"static"`` (calibrated qparams), ``"dynamic"`` (per token at run
        time), or None (float, or not a Linear of this recipe). A static recipe's dynamic Linears may keep qparams
        (the search's trials do): ``dynamic_linears`` decides."""
        if module in self.float_linears:
            return None
        if self.config.w8a8 == "dynamic":
            return "dynamic" if module in self.w8a8.get("linears", []) else None
        if module in self.w8a8.get("dynamic_linears", {}):
            return "dynamic"
        return "static" if linear_key(module, "scale") in self.tensors else None

    @property
    def smoothing(self) -> list[dict]:
        """Every smoothing group to fold into the float weights: W8A8's (``w8a8.smooth``), then the key smoothing of
        each site that has a ``layers.<i>.key_smooth.scale`` (:func:`key_smoothing_groups`)."""
        return list(self.w8a8.get("smooth", [])) + key_smoothing_groups(self.sites, self.tensors)

    def w8a8_linears(self) -> list[str]:
        """The Linears (module paths) this recipe quantizes to W8A8: those with input qparams (dynamic W8A8: those
        listed in ``w8a8.linears``), less the float ones."""
        if self.config.w8a8 == "dynamic":
            names = set(self.w8a8.get("linears", []))
        else:
            names = {m.group(1) for k in self.tensors if (m := _LINEAR_KEY.fullmatch(k))}
            names |= set(self.w8a8.get("dynamic_linears", {}))
        return sorted(names - set(self.float_linears))

    def replace(self, **changes) -> "Recipe":
        """A new recipe with ``changes`` (e.g. ``w8a8={...}``)."""
        fields = {
            "config": self.config,
            "sites": self.sites,
            "tensors": self.tensors,
            "stats": self.stats,
            "w8a8": self.w8a8,
        }
        return Recipe(**{**fields, **changes})

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in sorted(self.tensors.items())}
        save_file(tensors, str(directory / TENSORS_FILE), metadata={"format": f"qpass-recipe-v{TENSORS_VERSION}"})
        # one metadata key: safetensors writes a multi-key metadata map in no fixed order
        doc = {
            "format": "qpass-recipe",
            "version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "sites": [asdict(s) for s in self.sites],
            "axes": {k: list(axes(k)) for k in sorted(self.tensors)},
            "stats": _plain(self.stats),
        }
        if self.w8a8:
            doc["w8a8"] = _plain(self.w8a8)
        (directory / JSON_FILE).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> "Recipe":
        from safetensors import safe_open

        directory = Path(directory)
        json_path, tensor_path = directory / JSON_FILE, directory / TENSORS_FILE
        if not json_path.is_file() or not tensor_path.is_file():
            raise QpassError(
                f"--recipe {directory}: needs {JSON_FILE} and {TENSORS_FILE}; "
                "give a directory written by `qpass compile` (its recipe/ folder)"
            )
        fix = "recalibrate with `qpass compile`"
        try:
            doc = json.loads(json_path.read_text(encoding="utf-8"))
            if not isinstance(doc, dict):
                raise TypeError("not a JSON object")
            version = doc.get("version")
            if version != FORMAT_VERSION:
                raise QpassError(
                    f"--recipe {directory}: recipe version {version!r} is not {FORMAT_VERSION}; "
                    "recalibrate with this qpass"
                )
            config = QuantConfig.from_dict(doc["config"])
            sites = [
                SiteGeometry(**{**s, "projections": tuple(s.get("projections", ("", "", "")))}) for s in doc["sites"]
            ]
            stats, w8a8 = doc.get("stats", {}), doc.get("w8a8", {})
            if not isinstance(stats, dict) or not isinstance(w8a8, dict):
                raise TypeError("stats and w8a8 must be objects")
            if "window" in doc["config"] and CALIBRATED_WITH not in stats:  # an older recipe kept it in the config
                stats = {**stats, CALIBRATED_WITH: {"window": doc["config"]["window"]}}
            if not isinstance(w8a8.get("float_linears", {}), dict) or not isinstance(w8a8.get("smooth", []), list):
                raise TypeError("w8a8.float_linears must be an object and w8a8.smooth a list")
            linears = w8a8.get("linears", [])
            if not isinstance(linears, list) or not all(isinstance(m, str) for m in linears):
                raise TypeError("w8a8.linears must be a list of module paths")
            if config.w8a8 == "dynamic" and not linears:
                raise TypeError("a dynamic W8A8 recipe lists its Linears under w8a8.linears")
            dynamic = w8a8.get("dynamic_linears", {})
            if not isinstance(dynamic, dict) or (dynamic and config.w8a8 != "static"):
                raise TypeError("w8a8.dynamic_linears must be an object, in a static W8A8 recipe only")
            if set(dynamic) & set(w8a8.get("float_linears", {})):
                raise TypeError(f"{sorted(set(dynamic) & set(w8a8['float_linears']))[0]} is both float and dynamic")
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
            raise QpassError(
                f"--recipe {directory}: {JSON_FILE} is not a qpass recipe ({type(err).__name__}: {err}); {fix}"
            ) from None
        try:
            with safe_open(str(tensor_path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise QpassError(f"--recipe {directory}: cannot read {TENSORS_FILE} ({err}); {fix}") from None
        recipe = cls(config, sites, tensors, stats, w8a8)
        kinds = ("fa_q", "fa_k", "fa_v") * config.fa_quant + ("kv_k", "kv_v") * (config.kv_cache == "static")
        for site in recipe.sites:  # every site's tensors, refused here rather than after the model is captured
            for kind in kinds:
                recipe.get(site.layer, kind)
        layers = {site.layer for site in recipe.sites}
        named = {site.layer for site in recipe.sites if all(p and "?" not in p for p in site.projections[:2])}
        keyed = sorted(int(m.group(1)) for n in tensors if (m := _KEY_SMOOTH.fullmatch(n)))
        if keyed and config.kv_cache != "dynamic":
            raise QpassError(
                f"--recipe {directory}: {TENSORS_FILE} holds key smoothing (layer {keyed[0]}), which only a recipe of "
                f"the dynamic cache has; {fix}"
            )
        if set(keyed) - named:
            raise QpassError(
                f"--recipe {directory}: {TENSORS_FILE} holds key smoothing for layer {min(set(keyed) - named)}, whose "
                f"q and k projections {JSON_FILE} does not name; {fix}"
            )
        stray = sorted(n for n in tensors if _SITE_KEY.fullmatch(n) and int(n.split(".")[1]) not in layers)
        if stray:  # the two files disagree: one of them was replaced or edited
            raise QpassError(
                f"--recipe {directory}: {TENSORS_FILE} holds {stray[0]}, of a layer {JSON_FILE} lists no site for "
                f"({len(stray)} such); the two files are not of one calibration: {fix}"
            )
        return recipe

    def check_matches(self, geometry: tuple[SiteGeometry, ...]) -> None:
        """Refuse a recipe calibrated for a model with other attention sites: other geometry, or other module
        names where both have them (a recipe read from a weight directory may lack the projections', and an ONNX
        graph's constant-folded weights carry no module names: a recipe calibrated on the PyTorch model applies to
        its ONNX export)."""

        def fits(ours: SiteGeometry, theirs: SiteGeometry) -> bool:
            names = [
                (a, b)
                for a, b in zip((ours.prefix, *ours.projections), (theirs.prefix, *theirs.projections))
                if a and b and "?" not in (a, b)
            ]
            return (ours.layer, ours.num_heads, ours.num_kv_heads, ours.head_dim) == (
                theirs.layer,
                theirs.num_heads,
                theirs.num_kv_heads,
                theirs.head_dim,
            ) and all(a == b for a, b in names)

        geometry = tuple(geometry)
        if len(geometry) != len(self.sites) or not all(fits(a, b) for a, b in zip(self.sites, geometry)):
            first = next(
                (
                    f"layer {a.layer}: recipe {_site_words(a)} vs model {_site_words(b)}"
                    for a, b in zip(self.sites, geometry)
                    if not fits(a, b)
                ),
                f"recipe has {len(self.sites)} sites, the model {len(geometry)}",
            )
            raise QpassError(f"--recipe: it was calibrated for another model ({first}); calibrate this model instead")


def _site_words(site: SiteGeometry) -> str:
    """``site`` in a few words, for a one-line error:
    ``4 heads, 2 kv heads, head_dim 16 at model.layers.0.self_attn``."""
    return f"{site.num_heads} heads, {site.num_kv_heads} kv heads, head_dim {site.head_dim} at {site.prefix or '?'}"


def _plain(doc):
    """``doc`` with read-only mappings turned back into dicts, for JSON."""
    if isinstance(doc, (dict, MappingProxyType)):
        return {k: _plain(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [_plain(v) for v in doc]
    return doc
