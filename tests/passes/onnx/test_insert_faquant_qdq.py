"""InsertFAQuantQDQPass (qpass/passes/onnx/insert_faquant_qdq.py): QuantizeLinear/DequantizeLinear on q, k and v
after RoPE, per head and dim, where attention reads them (behind the int8 cache: on what attention reads from it).
Where it inserts (structure), the logits against the eager model with the same round trip (numbers), and what it
does not apply to (negatives). On tiny Llama exports at opset 20 (MatMul-Softmax-MatMul) and 23 (``Attention``);
the recipes hold C8's scales too (``kv_cache="static"``)."""

import numpy as np
import onnx_ir as ir
import pytest
import torch

from qpass.core.errors import QpassError
from qpass.core.int8 import fake_quant
from qpass.passes.onnx.insert_faquant_qdq import InsertFAQuantQDQPass
from qpass.passes.onnx.insert_kv_cache_qdq import DEQUANTIZED, InsertKVCacheQDQPass
from tests.helpers.eager_attention import with_attention_inputs
from tests.helpers.onnx_tiny import HEAD_DIM, LAYERS, VOCAB, load, op_types, run, tiny_llama, tiny_recipe

KINDS = ("q", "k", "v")


@pytest.fixture(scope="module")
def recipe():
    return tiny_recipe(fa_quant=True, kv_cache="static")


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, VOCAB, (2, 24))


def round_trip_input(value: ir.Value) -> ir.Value:
    """The value a fake-quant chain (Transpose, Reshape, QuantizeLinear, ...) reads, from its QuantizeLinear."""
    reshape = value.producer()
    transpose = reshape.inputs[0].producer()
    assert (reshape.op_type, transpose.op_type) == ("Reshape", "Transpose")
    return transpose.inputs[0]


# structure


@pytest.mark.parametrize("opset", [20, 23])
def test_q_k_v_get_a_round_trip_per_head_and_dim_that_every_reader_reads(tiny_onnx, recipe, opset):
    model, found = load(tiny_onnx[opset])
    values = {v.name: v for node in model.graph for v in node.outputs}
    readers = {
        getattr(s, kind): {use.node.name for use in values[getattr(s, kind)].uses()} for s, _ in found for kind in KINDS
    }
    rewrite = InsertFAQuantQDQPass(found, recipe)
    assert rewrite(model).modified and rewrite.count == 3 * LAYERS
    assert op_types(model).count("QuantizeLinear") == op_types(model).count("DequantizeLinear") == 3 * LAYERS
    quantizers = {round_trip_input(n.inputs[0]).name: n for n in model.graph if n.op_type == "QuantizeLinear"}
    for site, _ in found:
        for kind in KINDS:
            value = values[getattr(site, kind)]
            assert [use.node.op_type for use in value.uses()] == ["Transpose"]  # only the round trip reads it now
            node = quantizers[value.name]
            (dequantize,) = [use.node for use in node.outputs[0].uses()]
            out = dequantize.outputs[0].uses()[0].node.outputs[0].uses()[0].node.outputs[0]  # Reshape, Transpose back
            assert {use.node.name for use in out.uses()} == readers[value.name]
            heads = site.num_heads if kind == "q" else site.num_kv_heads
            scale, zero = (v.const_value.numpy() for v in node.inputs[1:3])
            want_scale, want_zero = recipe.get(site.layer, f"fa_{kind}")
            assert want_scale.shape == (heads, HEAD_DIM)
            np.testing.assert_array_equal(scale, want_scale.flatten().numpy().astype(np.float32))
            np.testing.assert_array_equal(zero, want_zero.flatten().numpy().astype(np.int8))
    assert {v.dtype for v in model.graph.inputs if v.name.startswith("past_key_values.")} == {ir.DataType.FLOAT}


def test_behind_the_int8_cache_k_and_v_are_quantized_as_attention_reads_them(tiny_onnx, recipe):
    """After InsertKVCacheQDQPass, FAQuant's K and V round trips read the dequantized cache, not the new K and V."""
    model, found = load(tiny_onnx[20])
    InsertKVCacheQDQPass(found, recipe)(model)
    rewrite = InsertFAQuantQDQPass(found, recipe)
    assert rewrite(model).modified and rewrite.count == 3 * LAYERS
    read = {round_trip_input(n.inputs[0]).name for n in model.graph if n.op_type == "QuantizeLinear"}
    for site, cache in found:
        assert {site.q, cache.present_key + DEQUANTIZED, cache.present_value + DEQUANTIZED} <= read
        assert site.k in read and site.v in read  # C8's own quantize of the new K and V, into the cache
    assert op_types(model).count("QuantizeLinear") == 5 * LAYERS  # C8: k, v; FAQuant: q, k, v


# numbers


@pytest.mark.parametrize("opset", [20, 23])
def test_logits_are_the_models_with_the_round_trip_on_q_k_v(tiny_onnx, recipe, ids, opset):
    """ONNX Runtime's logits against the eager model with ``fake_quant`` on its query, key and value with the same
    scales: within a tenth of their distance to the float logits (a later layer's code may flip where ONNX Runtime
    and PyTorch round the float values apart)."""
    model, found = load(tiny_onnx[opset])
    InsertFAQuantQDQPass(found, recipe)(model)
    got = torch.from_numpy(run(model, ids)["logits"])

    def round_trip(layer, query, key, value):
        out = []
        for kind, x in zip(KINDS, (query, key, value)):
            scale, offset = recipe.get(layer, f"fa_{kind}")
            out.append(fake_quant(x, scale[None, :, None, :], offset[None, :, None, :]))
        return out

    with torch.no_grad():
        expected = with_attention_inputs(tiny_llama(), round_trip)(torch.from_numpy(ids)).logits
        float_logits = tiny_llama()(torch.from_numpy(ids)).logits
    gap = (expected - float_logits).abs().max().item()
    assert gap > 1e-3
    assert (got - expected).abs().max().item() < gap / 10


# the pass contract and negatives


def test_no_sites_no_change(tiny_onnx, recipe):
    model, _ = load(tiny_onnx[20])
    before = op_types(model)
    rewrite = InsertFAQuantQDQPass([], recipe)
    assert rewrite(model).modified is False and rewrite.count == 0
    assert op_types(model) == before


@pytest.mark.xfail(
    strict=True,
    raises=ValueError,
    reason="a second run registers the scales' initializers again "
    "(onnx-ir: already registered) instead of changing nothing",
)
def test_a_second_run_changes_nothing(tiny_onnx, recipe):
    model, found = load(tiny_onnx[20])
    rewrite = InsertFAQuantQDQPass(found, recipe)
    assert rewrite(model).modified
    assert rewrite(model).modified is False


def test_a_recipe_without_faquant_scales_is_refused_before_any_change(tiny_onnx):
    model, found = load(tiny_onnx[20])
    before = op_types(model)
    with pytest.raises(QpassError, match=r"recipe: no layers\.0\.fa_q\.scale"):
        InsertFAQuantQDQPass(found, tiny_recipe(kv_cache="static"))(model)
    assert op_types(model) == before
