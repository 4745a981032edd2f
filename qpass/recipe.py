"""The calibrated result, frontend-neutral: per site, scales and offsets, plus the config that made them.

Saved as ``recipe.safetensors`` (the tensors) and ``recipe.json`` (config, sites, granularity), so
calibration and compilation can run apart. Tensor names, all float32:

    layers.<i>.fa_q.scale / .offset     [num_heads, head_dim]      FAQuant Q
    layers.<i>.fa_k.scale / .offset     [num_kv_heads, head_dim]   FAQuant K
    layers.<i>.fa_v.scale / .offset     [num_kv_heads, head_dim]   FAQuant V
    layers.<i>.kv_k.scale / .offset     [num_kv_heads * head_dim]  C8 K, per channel
    layers.<i>.kv_v.scale / .offset     [num_kv_heads * head_dim]  C8 V, per channel

    w8a8.<linear>.input_scale / .input_offset  [1]     W8A8 activation qparams of a quantized Linear
                                                        (``<linear>`` an HF module path, e.g.
                                                        model.layers.0.self_attn.q_proj)
    smooth.<i>.scale                    [prev channels]    smoothing group i (see qpass/smoothing.py)

Offsets follow ``q = clamp(round(x / scale) + offset)``, ``x = (q - offset) * scale``.

With W8A8 the JSON has a ``w8a8`` object: ``act_method``, ``anti_method``, ``alpha``,
``disable_level``, ``smooth`` (the smoothing groups, schema in ``qpass/smoothing.py``) and
``float_linears`` (HF module path -> why it stays float). Linears not listed there are quantized.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qpass.config import QuantConfig
from qpass.errors import QpassError

FORMAT_VERSION = 1
TENSORS_FILE = "recipe.safetensors"
JSON_FILE = "recipe.json"


@dataclass(frozen=True)
class SiteGeometry:
    """What a recipe needs to know of an attention site to be applied to a graph again."""

    layer: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass
class Recipe:
    config: QuantConfig
    sites: list[SiteGeometry]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)  # per-site SQNR and the like, for the report
    w8a8: dict = field(default_factory=dict)   # W8A8 policy and smoothing groups (module docstring); {} without W8A8

    def get(self, layer: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, offset)`` of ``kind`` (``fa_q``, ``fa_k``, ``fa_v``, ``kv_k``, ``kv_v``) at ``layer``."""
        prefix = f"layers.{layer}.{kind}"
        try:
            return self.tensors[f"{prefix}.scale"], self.tensors[f"{prefix}.offset"]
        except KeyError:
            raise QpassError(f"recipe: no {prefix}.scale/.offset; recalibrate with the options this compile asks for") from None

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in sorted(self.tensors.items())}
        save_file(tensors, str(directory / TENSORS_FILE), metadata={"format": f"qpass-recipe-v{FORMAT_VERSION}"})
        # one metadata key: safetensors writes a multi-key metadata map in no fixed order
        doc = {
            "format": "qpass-recipe",
            "version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "sites": [asdict(s) for s in self.sites],
            "stats": self.stats,
        }
        if self.w8a8:
            doc["w8a8"] = self.w8a8
        (directory / JSON_FILE).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> "Recipe":
        directory = Path(directory)
        json_path, tensor_path = directory / JSON_FILE, directory / TENSORS_FILE
        if not json_path.is_file() or not tensor_path.is_file():
            raise QpassError(f"--recipe {directory}: needs {JSON_FILE} and {TENSORS_FILE}; give a directory written by `qpass compile` (its recipe/ folder)")
        try:
            doc = json.loads(json_path.read_text(encoding="utf-8"))
            config = QuantConfig(**doc["config"])
            sites = [SiteGeometry(**s) for s in doc["sites"]]
        except (ValueError, KeyError, TypeError) as err:
            raise QpassError(f"--recipe {directory}: {JSON_FILE} is not a qpass recipe ({err}); recalibrate with `qpass compile`") from err
        if doc.get("version") != FORMAT_VERSION:
            raise QpassError(f"--recipe {directory}: recipe version {doc.get('version')} is not {FORMAT_VERSION}; recalibrate with this qpass")
        try:
            with safe_open(str(tensor_path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise QpassError(f"--recipe {directory}: cannot read {TENSORS_FILE} ({err}); recalibrate with `qpass compile`") from err
        return cls(config, sites, tensors, doc.get("stats", {}), doc.get("w8a8", {}))

    def check_matches(self, geometry: list[SiteGeometry]) -> None:
        """Refuse a recipe calibrated for a model with other attention sites."""
        if geometry != self.sites:
            first = next((f"layer {a.layer}: recipe {a} vs model {b}" for a, b in zip(self.sites, geometry) if a != b),
                         f"recipe has {len(self.sites)} sites, the model {len(geometry)}")
            raise QpassError(f"--recipe: it was calibrated for another model ({first}); calibrate this model instead")
