"""What there is to quantize, frontend-neutral: attention sites, Linears, and smoothing groups.

A frontend finds these from its graph's structure (never from names) and names the values it will
observe and rewrite in its own IR (``q``, ``k``, ``v``, ``input``: opaque strings to the core). Module
paths (``prefix``, ``*_from``, ``module``) are the model's own parameter names: they label the
report and give exporters the names their formats use.
"""

from dataclasses import dataclass

KINDS = ("q", "k", "v")


@dataclass(frozen=True)
class AttentionSite:
    """One attention: the values to quantize and its head geometry.

    ``q [B, H, S, D]`` after RoPE; ``k``, ``v [B, H_kv, S, D]`` after RoPE and before GQA's repeat
    (what a KV cache holds). ``prefix`` is the attention module's path (e.g.
    ``model.layers.0.self_attn``), the common parent of the q/k/v projections, or "" when unknown.
    """

    layer: int
    attention: str  # the fused op, or the softmax of a matmul-softmax-matmul attention
    form: str  # the spelling that matched ("sdpa", "matmul-softmax-matmul", ...)
    q: str
    k: str
    v: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: bool
    qk_norm: bool
    q_from: str  # the parameter that projects Q (e.g. model.layers.0.self_attn.q_proj.weight), "?" if none
    k_from: str
    v_from: str
    prefix: str = ""

    @property
    def projections(self) -> tuple[str, str, str]:
        """The q, k and v projection modules (their weights' paths without ``.weight``)."""
        return tuple(p.removesuffix(".weight") for p in (self.q_from, self.k_from, self.v_from))


def module_prefix(q_from: str, k_from: str, v_from: str) -> str:
    """The common parent module of the q/k/v projections (their weights' paths), or "" when they have none."""
    parents = {p.removesuffix(".weight").rpartition(".")[0] for p in (q_from, k_from, v_from)}
    return parents.pop() if len(parents) == 1 and "?" not in (q_from, k_from, v_from) else ""


@dataclass(frozen=True)
class LinearSite:
    """One Linear: ``y [..., out_features] = x [..., in_features] @ W^T + b``; ``input`` names ``x`` in the IR."""

    node: str
    input: str
    weight: str  # the weight's value in the IR
    bias: str | None
    module: str  # model module path, e.g. model.layers.0.self_attn.q_proj
    in_features: int
    out_features: int


@dataclass(frozen=True)
class SmoothGroup:
    """Linears sharing the input ``input`` whose channels ``prev`` produces (see :mod:`qpass.core.smoothing`)."""

    input: str  # value feeding the consumers, observed in calibration
    prev: str  # module path of the norm or Linear producing the input
    prev_kind: str  # "norm" or "linear"
    consumers: tuple[str, ...]  # module paths
    channels: int  # prev's channels: the length of the smoothing scale
    group: int = 1  # GQA: consumer channels per prev channel block
    head_dim: int | None = None

    def to_recipe(self, scale_name: str) -> dict:
        """The group as recipe JSON (``w8a8.smooth`` entries, see :mod:`qpass.core.smoothing`)."""
        doc = {
            "scale": scale_name,
            "prev": self.prev,
            "prev_kind": self.prev_kind,
            "consumers": list(self.consumers),
            "group": self.group,
        }
        if self.head_dim is not None:
            doc["head_dim"] = self.head_dim
        return doc


@dataclass(frozen=True)
class DecoderLayer:
    """One decoder layer as a frontend iterates them (for layer-wise work): its attention and its Linears."""

    index: int
    attention: AttentionSite
    linears: tuple[LinearSite, ...]
