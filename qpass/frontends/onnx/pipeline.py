"""The ONNX frontend's pass pipeline: the recipe's Q/DQ into an onnx-ir model, in this order.

1. ``InsertKVCacheQDQPass`` (the int8 cache, :func:`int8_cache`: C8's scales with ``--kv-int8``, FAQuant's
   ``fa_k``/``fa_v`` with ``--fa-quant`` alone): the cache I/O becomes int8; attention reads the dequantized
   cache (on GroupQueryAttention graphs ``QuantizeGQAKVCachePass`` instead: ONNX Runtime's own int8 cache,
   symmetric, with an asymmetric recipe's zero points moved into the graph as centres);
   unless both are asked for, ``FoldKVCacheScalesPass`` then lowers that for ONNX Runtime: attention reads
   ``Cast(present)`` and the scales fold into q and the attention output (no per-step transpose of the cache);
2. ``InsertFAQuantQDQPass`` (FAQuant): q, k, v round trips; after C8 because with both, FAQuant's k and v
   are the dequantized cache (C8's round trip first, as in the PyTorch path); with FAQuant alone q only, its
   cache already holding K and V on FAQuant's grid (and after the fold, so the fold's ``q * s_k`` reads the
   quantized q);
3. after each (``verify``), onnx-ir's ``CheckerPass`` with ``full_check`` (where the input model passed it; it
   also checks that the nodes are in topological order) and qpass's own invariant (``VerifyInt8CachePass``),
   all under onnx-ir's ``PassManager``.

The model records its sites as metadata (``qpass.sites``) so that a saved model can be measured again.
"""

import json

import onnx_ir as ir
from onnx_ir.passes.common import CheckerPass

from qpass.core.errors import QpassError
from qpass.core.recipe import Recipe
from qpass.core.sites import AttentionSite
from qpass.frontends.onnx.load import GQA_FORM
from qpass.passes.onnx.base import SITES_METADATA
from qpass.passes.onnx.find_attention_sites import CacheIO
from qpass.passes.onnx.fold_kv_cache_scales import FoldKVCacheScalesPass
from qpass.passes.onnx.insert_faquant_qdq import InsertFAQuantQDQPass
from qpass.passes.onnx.insert_kv_cache_qdq import InsertKVCacheQDQPass
from qpass.passes.onnx.quantize_gqa_kv_cache import GQAKVScales, QuantizeGQAKVCachePass
from qpass.passes.onnx.verify_int8_cache import VerifyInt8CachePass


def int8_cache(config) -> bool:
    """Whether ``config`` gives an ONNX model an int8 KV cache: C8 (``--kv-int8``, static) or FAQuant
    (``--fa-quant``, whose K and V are what the cache holds), as on the PyTorch path."""
    return config.kv_cache == "static" or config.fa_quant


def cache_scales(config) -> str:
    """Whose k/v scales the int8 cache holds: C8's (``kv``) where asked for, else FAQuant's (``fa``)."""
    return "kv" if config.kv_cache == "static" else "fa"


def quantize_model(
    model: ir.Model,
    found: list[tuple[AttentionSite, CacheIO | None]],
    recipe: Recipe,
    verify: bool = True,
    full_check: bool = True,
) -> tuple[ir.Model, dict[str, int]]:
    """``model`` rewritten in place as ``recipe`` says: ``(model, {pass name: values rewritten})``."""
    config = recipe.config
    check_config(config, [site for site, _ in found])
    passes = _passes(recipe, found)
    sequence = []
    for p in passes:
        sequence.append(p)  # each inserts its nodes right after their inputs' producers: the order stays topological
        if (
            verify
        ):  # onnxruntime-genai's graphs fail onnx.checker as the builder writes them: ORT loading them is the check
            sequence += [CheckerPass(full_check=True)] if full_check else []
            sequence.append(VerifyInt8CachePass(found))
    try:
        ir.passes.PassManager(sequence)(model)
    except ir.passes.PassError as err:  # the manager wraps what a pass raised, and the pass wraps it again
        cause = err
        while isinstance(cause, ir.passes.PassError) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, QpassError):
            raise cause from None
        raise QpassError(
            f"the rewritten ONNX model fails onnx.checker ({str(cause).splitlines()[0][:200]}); "
            "please report this model"
        ) from None
    counts = {}
    for p in passes:
        if not p.count and not isinstance(p, FoldKVCacheScalesPass):  # a softcapped Attention keeps the QDQ form
            raise QpassError(
                f"{type(p).__name__} rewrote nothing although the recipe asks for it; please report this model"
            )
        counts[type(p).__name__] = p.count
        if getattr(p, "centred", 0):  # the GQA cache with K and V centred (an asymmetric recipe), reported as such
            counts["GQA K/V centred"] = p.centred
    model.metadata_props[SITES_METADATA] = json.dumps([site_doc(s, c) for s, c in found])
    return model, counts


def _passes(recipe: Recipe, found: list[tuple[AttentionSite, CacheIO | None]]) -> list[ir.passes.PassBase]:
    """The rewriting passes ``recipe`` asks for, in order (module docstring)."""
    config, passes = recipe.config, []
    scales = cache_scales(config)
    # a model without cache I/O has no cache to make int8: FAQuant alone then quantizes its k and v in place
    cached = int8_cache(config) and (config.kv_cache == "static" or any(cache is not None for _, cache in found))
    if cached and any(site.form == GQA_FORM for site, _ in found):  # FAQuant is refused there (check_config)
        affine = [
            [tuple(t.numpy() for t in recipe.get(site.layer, f"{scales}_{kind}")) for kind in ("k", "v")]
            for site, _ in found
        ]
        gqa_scales = [GQAKVScales.from_affine(k, v, centred=not config.symmetric) for k, v in affine]
        passes.append(QuantizeGQAKVCachePass(gqa_scales))
    elif cached:
        passes.append(InsertKVCacheQDQPass(found, recipe, scales))
        if not (config.fa_quant and config.kv_cache == "static"):  # in stages: the QDQ cache, then its fold
            passes.append(FoldKVCacheScalesPass(found, recipe, scales))
    if config.fa_quant:  # with FAQuant's own cache, its k and v are the cache's codes already
        kinds = ("q",) if cached and scales == "fa" else ("q", "k", "v")
        passes.append(InsertFAQuantQDQPass(found, recipe, kinds))
    return passes


def check_config(config, sites: list[AttentionSite]) -> None:
    """Refuse what this frontend cannot do to an ONNX model: W8A8 (no ONNX form here; the dynamic cache is the ONNX
    exporter's refusal, :func:`qpass.exporters.onnx_format.refusal`), and on
    GroupQueryAttention (RoPE fused inside) FAQuant. An asymmetric cache on GroupQueryAttention, whose int8 cache
    has no zero point, is centred in the graph instead (:mod:`qpass.passes.onnx.gqa_centre`)."""
    if config.w8a8:
        raise QpassError(
            "--w8a8: qpass quantizes the attention of ONNX models (--kv-int8, --fa-quant), not their Linears; "
            "compile the PyTorch model (a Hugging Face directory or .gguf) for W8A8"
        )
    if any(site.form == GQA_FORM for site in sites):
        if config.fa_quant:
            raise QpassError(
                "--fa-quant: this model's GroupQueryAttention applies RoPE inside the op, so q, k and v after "
                "RoPE never appear in the graph; use --kv-int8, or export the model with torch.onnx"
            )


def read_sites(model: ir.Model) -> list[dict]:
    """The sites a quantized model recorded (:data:`SITES_METADATA`)."""
    doc = model.metadata_props.get(SITES_METADATA)
    if doc is None:
        raise QpassError(f"the ONNX model has no {SITES_METADATA} metadata; give a model written by `qpass compile`")
    return json.loads(doc)


def site_doc(site: AttentionSite, cache: CacheIO | None) -> dict:
    """A site and its cache as JSON (the ``qpass.sites`` metadata, and what :class:`session.Runner` sizes caches by)."""
    doc = {
        "layer": site.layer,
        "form": site.form,
        "attention": site.attention,
        "q": site.q,
        "k": site.k,
        "v": site.v,
        "num_heads": site.num_heads,
        "num_kv_heads": site.num_kv_heads,
        "head_dim": site.head_dim,
    }
    if cache is not None:
        doc.update(
            past_key=cache.past_key,
            past_value=cache.past_value,
            present_key=cache.present_key,
            present_value=cache.present_value,
        )
    return doc
