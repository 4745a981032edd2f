"""InsertKVCacheQDQPass (qpass/passes/onnx/insert_kv_cache_qdq.py) with C8's scales (``kv_cache="static"``): per
site, ``present = Concat(past, k)`` runs in int8 on ``QuantizeLinear(k)``, the cache I/O becomes int8, and attention
reads ``DequantizeLinear(present)``. The int8 I/O and where the nodes sit (structure), the codes in the cache and the
logits against the eager model with the same round trip, decoding on the cache (numbers), and what it does not
apply to (negatives). On tiny Llama exports at opset 20 (MatMul-Softmax-MatMul) and 23 (``Attention``)."""

import numpy as np
import onnx_ir as ir
import pytest
import torch

from qpass.core.errors import QpassError
from qpass.core.int8 import fake_quant, quantize
from qpass.passes.onnx.insert_kv_cache_qdq import DEQUANTIZED, InsertKVCacheQDQPass
from tests.helpers.eager_attention import with_attention_inputs
from tests.helpers.onnx_tiny import (
    HEAD_DIM,
    KV_HEADS,
    LAYERS,
    VOCAB,
    as_past,
    load,
    op_types,
    run,
    tiny_llama,
    tiny_recipe,
)

CACHE = [
    f"{io}.{layer}.{side}"
    for io in ("past_key_values", "present")
    for layer in range(LAYERS)
    for side in ("key", "value")
]


@pytest.fixture(scope="module")
def recipe():
    return tiny_recipe(kv_cache="static")


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, VOCAB, (2, 24))


def rewritten(path, recipe):
    model, found = load(path)
    rewrite = InsertKVCacheQDQPass(found, recipe)
    return model, found, rewrite, rewrite(model)


def per_channel(recipe, layer: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe's ``kv_<kind>`` ``[kv_heads * head_dim]`` as ``[1, kv_heads, 1, head_dim]``."""
    return tuple(t.reshape(1, KV_HEADS, 1, HEAD_DIM) for t in recipe.get(layer, f"kv_{kind}"))


# structure


@pytest.mark.parametrize("opset", [20, 23])
def test_the_cache_io_becomes_int8_written_through_quantize_and_read_through_dequantize(tiny_onnx, recipe, opset):
    float_model, _ = load(tiny_onnx[opset])
    model, found, rewrite, result = rewritten(tiny_onnx[opset], recipe)
    assert result.modified and rewrite.count == 2 * LAYERS
    io = {v.name: v.dtype for v in (*model.graph.inputs, *model.graph.outputs)}
    assert {name: io[name] for name in CACHE} == dict.fromkeys(CACHE, ir.DataType.INT8)
    assert {k: v for k, v in io.items() if k not in CACHE} == {
        "input_ids": ir.DataType.INT64,
        "attention_mask": ir.DataType.INT64,
        "position_ids": ir.DataType.INT64,
        "logits": ir.DataType.FLOAT,
    }
    assert op_types(model).count("QuantizeLinear") == op_types(model).count("DequantizeLinear") == 2 * LAYERS
    assert op_types(float_model).count("QuantizeLinear") == 0
    values = {v.name: v for node in model.graph for v in node.outputs}
    for site, cache in found:
        for kind, present in (("k", cache.present_key), ("v", cache.present_value)):
            concat = values[present].producer()
            assert concat.op_type == "Concat" and concat.inputs[0].name == present.replace(
                "present.", "past_key_values."
            )
            chain, node = [], concat.inputs[1].producer()
            while node.op_type != "QuantizeLinear":
                chain.append(node.op_type)
                node = node.inputs[0].producer()
            assert chain == ["Transpose", "Reshape"]  # back from the per-axis layout
            reshape = node.inputs[0].producer()
            transpose = reshape.inputs[0].producer()
            assert (reshape.op_type, transpose.op_type) == ("Reshape", "Transpose")  # into the per-axis layout
            assert transpose.inputs[0] is values[getattr(site, kind)]
            scale, zero = (v.const_value.numpy() for v in node.inputs[1:3])
            want_scale, want_zero = recipe.get(site.layer, f"kv_{kind}")
            np.testing.assert_array_equal(scale, want_scale.numpy().astype(np.float32))
            np.testing.assert_array_equal(zero, want_zero.numpy().astype(np.int8))
            dequantized = values[present + DEQUANTIZED]
            assert dequantized.uses() and all(use.node.op_type != "Concat" for use in dequantized.uses())
            assert values[present].is_graph_output()


# numbers


@pytest.mark.parametrize("opset", [20, 23])
def test_the_cache_holds_the_codes_of_k_and_v(tiny_onnx, recipe, ids, opset):
    """Layer 0's int8 cache is ``quantize(x, scale, offset)`` of the float model's K and V (a code apart at most
    where x / scale is near a half); the other layer's scales give another cache, so the check can fail."""
    float_model, _ = load(tiny_onnx[opset])
    model, _, _, _ = rewritten(tiny_onnx[opset], recipe)
    want, got = run(float_model, ids), run(model, ids)
    for kind, side in (("k", "key"), ("v", "value")):
        x = torch.from_numpy(want[f"present.0.{side}"])
        codes = got[f"present.0.{side}"]
        assert codes.dtype == np.int8 and codes.shape == x.shape
        diff = np.abs(codes.astype(np.int32) - quantize(x, *per_channel(recipe, 0, kind)).numpy())
        assert diff.max() <= 1 and (diff == 0).mean() > 0.999
        other = np.abs(codes.astype(np.int32) - quantize(x, *per_channel(recipe, 1, kind)).numpy())
        assert (other > 1).mean() > 0.1


@pytest.mark.parametrize("opset", [20, 23])
def test_logits_are_the_models_with_the_cache_round_trip(tiny_onnx, recipe, ids, opset):
    """ONNX Runtime's logits against the eager model with ``fake_quant`` on K and V with the same scales: within a
    tenth of their distance to the float logits (a later layer's code may flip where ONNX Runtime and PyTorch round
    the float values apart)."""
    model, _, _, _ = rewritten(tiny_onnx[opset], recipe)
    got = torch.from_numpy(run(model, ids)["logits"])

    def round_trip(layer, query, key, value):
        return (
            query,
            fake_quant(key, *per_channel(recipe, layer, "k")),
            fake_quant(value, *per_channel(recipe, layer, "v")),
        )

    with torch.no_grad():
        expected = with_attention_inputs(tiny_llama(), round_trip)(torch.from_numpy(ids)).logits
        float_logits = tiny_llama()(torch.from_numpy(ids)).logits
    gap = (expected - float_logits).abs().max().item()
    assert gap > 1e-3
    assert (got - expected).abs().max().item() < gap / 10


def test_decoding_on_the_int8_cache_gives_the_whole_sequences_logits(tiny_onnx, recipe, ids):
    """The prompt's int8 ``present.*`` fed back as ``past_key_values.*`` for the next token: its logits are those of
    the whole sequence run at once (per-channel static int8 stores each element alike either way)."""
    model, _, _, _ = rewritten(tiny_onnx[20], recipe)
    prompt = run(model, ids[:, :-1])
    assert all(prompt[name].dtype == np.int8 for name in prompt if name.startswith("present."))
    step = run(model, ids[:, -1:], as_past(prompt))
    whole = run(model, ids)
    np.testing.assert_allclose(step["logits"][:, -1], whole["logits"][:, -1], atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(step["present.1.value"], whole["present.1.value"])


# the pass contract and negatives


def test_no_sites_no_change(tiny_onnx, recipe):
    model, _ = load(tiny_onnx[20])
    before = op_types(model)
    rewrite = InsertKVCacheQDQPass([], recipe)
    assert rewrite(model).modified is False and rewrite.count == 0
    assert op_types(model) == before and {v.dtype for v in model.graph.inputs if v.name in CACHE} == {ir.DataType.FLOAT}


def test_graph_without_attention_is_left_as_it_is(recipe):
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 4]))
    node = ir.node("Relu", [x])
    node.outputs[0].name = "y"
    model = ir.Model(ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 20}), ir_version=10)
    assert InsertKVCacheQDQPass([], recipe)(model).modified is False
    assert op_types(model) == ["Relu"]


@pytest.mark.xfail(
    strict=True,
    raises=ValueError,
    reason="a second run registers the scales' initializers again "
    "(onnx-ir: already registered) instead of changing nothing",
)
def test_a_second_run_changes_nothing(tiny_onnx, recipe):
    model, _, rewrite, _ = rewritten(tiny_onnx[20], recipe)
    assert rewrite(model).modified is False


def test_a_site_without_cache_io_is_refused(tiny_onnx, recipe):
    model, found = load(tiny_onnx[20])
    with pytest.raises(
        QpassError,
        match=r"attention 0 .* has no KV cache inputs and outputs; export the decoder with "
        r"past_key_values\.\* inputs and present\.\* outputs",
    ):
        InsertKVCacheQDQPass([(site, None) for site, _ in found], recipe)(model)


def test_a_recipe_without_c8_scales_is_refused_before_any_change(tiny_onnx):
    model, found = load(tiny_onnx[20])
    before = op_types(model)
    with pytest.raises(QpassError, match=r"recipe: no layers\.0\.kv_k\.scale"):
        InsertKVCacheQDQPass(found, tiny_recipe(fa_quant=True))(model)
    assert op_types(model) == before
