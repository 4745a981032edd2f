"""Names, in one place: how a Hugging Face causal LM's checkpoint lays out its tensors, and qpass's own per-layer keys.

Checkpoint names (``model.layers.<i>.self_attn.q_proj.weight``) are what the frontends read, the exporters write
and the recipe's Linear entries name. qpass's own key of a per-layer value, ``layers.<i>.<name>``, names recipe
tensors (``layers.0.kv_k.scale``), layer-wise capture values (``layers.3.linear_2``) and, behind a ``qpass.``
prefix, the tensors and nodes the ONNX passes add.
"""

import re

LAYER_PREFIX = "model.layers."  # the decoder layers of a causal LM's checkpoint
EMBEDDING = "model.embed_tokens.weight"
NORM = "model.norm.weight"  # the final norm
LM_HEAD = "lm_head.weight"  # an untied model's LM head (a tied one is EMBEDDING)
_LAYER = re.compile(rf"{re.escape(LAYER_PREFIX)}(\d+)\.")


def layer_prefix(layer: int) -> str:
    """``model.layers.<layer>.``: the start of every checkpoint name in decoder layer ``layer``."""
    return f"{LAYER_PREFIX}{layer}."


def layer_of(name: str) -> int | None:
    """The decoder layer of checkpoint tensor or module path ``name`` (ending in ``.`` for a module), None outside
    the layers (embedding, final norm, LM head)."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def layer_key(layer: int, name: str) -> str:
    """qpass's key of ``name`` in decoder layer ``layer``: ``layers.<layer>.<name>``."""
    return f"layers.{layer}.{name}"


def onnx_name(layer: int, name: str) -> str:
    """The name of a tensor or node an ONNX pass adds for ``name`` at layer ``layer``:
    ``qpass.layers.<layer>.<name>``."""
    return f"qpass.{layer_key(layer, name)}"


FUSED_LINEARS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # fused by vLLM and MindIE: one quant type


def fused_siblings(module: str) -> list[str]:
    """The Linears that vLLM and MindIE fuse with ``module`` (a checkpoint module path), ``module`` among them, in
    :data:`FUSED_LINEARS` order: q/k/v of one attention block, gate/up of one MLP; ``[module]`` for any other."""
    parent, _, leaf = module.rpartition(".")
    group = next((g for g in FUSED_LINEARS if leaf in g), (leaf,))
    return [f"{parent}.{name}" if parent else name for name in group]
