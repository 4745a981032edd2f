"""FoldKVCacheScalesPass (qpass/passes/onnx/fold_kv_cache_scales.py), the lowering of C8's QDQ cache
(``kv_cache="static"``) for ONNX Runtime: attention reads ``Cast(present)`` and the scales fold into q (``* s_k``)
and the attention output (``- z_v``, ``* s_v``). What replaces what (structure), the same logits and decoding as
the QDQ form it replaces (numbers), and where it leaves the model alone (negatives: no QDQ cache, a softcapped
``Attention``). On tiny Llama exports at opset 20 (MatMul-Softmax-MatMul) and 23 (``Attention``)."""

import numpy as np
import onnx_ir as ir
import pytest

from qpass.core.naming import onnx_name
from qpass.passes.onnx.fold_kv_cache_scales import FoldKVCacheScalesPass
from qpass.passes.onnx.insert_kv_cache_qdq import DEQUANTIZED, InsertKVCacheQDQPass
from tests.helpers.onnx_tiny import (
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    LAYERS,
    VOCAB,
    as_past,
    load,
    op_types,
    run,
    tiny_recipe,
)


@pytest.fixture(scope="module")
def recipe():
    return tiny_recipe(kv_cache="static")


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, VOCAB, (2, 24))


def qdq_cache(path, recipe):
    """The export with C8's QDQ cache (InsertKVCacheQDQPass), and its sites."""
    model, found = load(path)
    assert InsertKVCacheQDQPass(found, recipe)(model).modified
    return model, found


# structure


@pytest.mark.parametrize("opset", [20, 23])
def test_attention_reads_the_int8_cache_through_a_cast_and_the_scales_fold_into_q_and_the_output(
    tiny_onnx, recipe, opset
):
    model, found = qdq_cache(tiny_onnx[opset], recipe)
    fold = FoldKVCacheScalesPass(found, recipe)
    assert fold(model).modified and fold.count == LAYERS
    ops = op_types(model)
    assert ops.count("DequantizeLinear") == 0 and ops.count("QuantizeLinear") == 2 * LAYERS  # the cache writes stay
    values = {v.name: v for node in model.graph for v in node.outputs}
    nodes = {node.name: node for node in model.graph}
    assert not any(name.endswith(DEQUANTIZED) for name in values)
    for site, cache in found:
        for present in (cache.present_key, cache.present_value):
            casts = [use.node for use in values[present].uses() if use.node.op_type == "Cast"]
            assert len(casts) == 1 and casts[0].attributes["to"].as_int() == ir.DataType.FLOAT
            assert casts[0].outputs[0].uses()  # attention reads it
        scale_q = nodes[onnx_name(site.layer, "fold_k_scale")]
        assert scale_q.op_type == "Mul" and scale_q.inputs[0] is values[site.q]
        assert [use.node for use in values[site.q].uses()] == [scale_q]
        sub, mul = nodes[onnx_name(site.layer, "fold_v_offset")], nodes[onnx_name(site.layer, "fold_v_scale")]
        assert sub.op_type == "Sub" and sub.inputs[0] is values[site.attention] and mul.inputs[0] is sub.outputs[0]
        k_scale = scale_q.inputs[1].const_value.numpy()
        assert k_scale.shape == (1, HEADS, 1, HEAD_DIM)
        want = recipe.get(site.layer, "kv_k")[0].numpy().reshape(KV_HEADS, HEAD_DIM)
        np.testing.assert_allclose(
            k_scale[0, :, 0], np.repeat(want, HEADS // KV_HEADS, axis=0)
        )  # query head h: KV head h // 2
        assert (
            mul.inputs[1].const_value.numpy().shape
            == sub.inputs[1].const_value.numpy().shape
            == (1, HEADS, 1, HEAD_DIM)
        )


# numbers


@pytest.mark.parametrize("opset", [20, 23])
def test_folding_changes_no_number(tiny_onnx, recipe, ids, opset):
    """A lowering: the same logits and int8 cache as the QDQ form it replaces, on whole windows and when decoding on
    the int8 cache."""
    qdq_form, _ = qdq_cache(tiny_onnx[opset], recipe)
    folded, found = qdq_cache(tiny_onnx[opset], recipe)
    assert FoldKVCacheScalesPass(found, recipe)(folded).modified
    want, got = run(qdq_form, ids), run(folded, ids)
    np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-4, rtol=1e-4)
    assert (np.abs(got["present.1.key"].astype(int) - want["present.1.key"]) <= 1).all()
    for _ in range(6):  # greedy decoding, each model on its own int8 cache
        tokens = got["logits"][:, -1:].argmax(-1)
        np.testing.assert_array_equal(tokens, want["logits"][:, -1:].argmax(-1))
        want, got = run(qdq_form, tokens, as_past(want)), run(folded, tokens, as_past(got))
        np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-4, rtol=1e-4)


# the pass contract and negatives


def test_a_model_without_the_qdq_cache_is_left_as_it_is(tiny_onnx, recipe):
    model, found = load(tiny_onnx[20])
    before = op_types(model)
    fold = FoldKVCacheScalesPass(found, recipe)
    assert fold(model).modified is False and fold.count == 0
    assert op_types(model) == before


def test_a_second_run_changes_nothing(tiny_onnx, recipe):
    model, found = qdq_cache(tiny_onnx[20], recipe)
    fold = FoldKVCacheScalesPass(found, recipe)
    assert fold(model).modified
    after = op_types(model)
    assert fold(model).modified is False and fold.count == LAYERS
    assert op_types(model) == after


def test_no_sites_no_change(tiny_onnx, recipe):
    model, _ = qdq_cache(tiny_onnx[20], recipe)
    before = op_types(model)
    assert FoldKVCacheScalesPass([], recipe)(model).modified is False
    assert op_types(model) == before


def test_a_softcapped_attention_keeps_the_qdq_form(tiny_onnx, recipe, ids):
    """Softcapping makes the scores' shift matter, so K's offset cannot be dropped: such a site is not folded."""
    model, found = qdq_cache(tiny_onnx[23], recipe)
    for node in model.graph:
        if node.op_type == "Attention":
            node.attributes["softcap"] = ir.AttrFloat32("softcap", 30.0)
    before = op_types(model)
    fold = FoldKVCacheScalesPass(found, recipe)
    assert fold(model).modified is False and fold.count == 0
    assert op_types(model) == before and before.count("DequantizeLinear") == 2 * LAYERS
