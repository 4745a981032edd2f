"""VerifyInt8CachePass (qpass/passes/onnx/verify_int8_cache.py), qpass's own invariant after each ONNX pass: every
int8 ``present.*`` is written through its quantization. It never changes the model (structure), passes the float
export and C8's rewrite (``kv_cache="static"``), and names an int8 cache fed by anything else (negatives). On the
tiny Llama export at opset 20."""

import numpy as np
import onnx_ir as ir
import pytest

from qpass.core.errors import QpassError
from qpass.passes.onnx import qdq
from qpass.passes.onnx.insert_kv_cache_qdq import InsertKVCacheQDQPass
from qpass.passes.onnx.verify_int8_cache import VerifyInt8CachePass
from tests.helpers.onnx_tiny import load, op_types, tiny_recipe


@pytest.fixture
def c8(tiny_onnx):
    model, found = load(tiny_onnx[20])
    InsertKVCacheQDQPass(found, tiny_recipe(kv_cache="static"))(model)
    return model, found


def test_the_float_export_passes_unchanged(tiny_onnx):
    model, found = load(tiny_onnx[20])
    before = op_types(model)
    assert VerifyInt8CachePass(found)(model).modified is False
    assert op_types(model) == before


def test_the_c8_rewrite_passes_unchanged(c8):
    model, found = c8
    before = op_types(model)
    assert VerifyInt8CachePass(found)(model).modified is False
    assert op_types(model) == before


def test_an_int8_cache_written_by_a_plain_cast_is_caught(c8):
    """An int8 cache fed by a Cast of the float K/V: a well-formed graph that onnx.checker accepts, and wrong."""
    model, found = c8
    concat = next(v for v in model.graph.outputs if v.name == "present.1.value").producer()
    quantized = concat.inputs[1]  # Transpose(Reshape(QuantizeLinear(Reshape(Transpose(v)))))
    float_v = (
        quantized.producer()
        .inputs[0]
        .producer()
        .inputs[0]
        .producer()
        .inputs[0]
        .producer()
        .inputs[0]
        .producer()
        .inputs[0]
    )
    assert float_v.dtype == ir.DataType.FLOAT
    cast = ir.node("Cast", [float_v], {"to": ir.DataType.INT8})
    model.graph.insert_before(concat, cast)
    concat.replace_input_with(1, cast.outputs[0])
    with pytest.raises(QpassError, match=r"writes the int8 cache present\.1\.value without its quantization"):
        VerifyInt8CachePass(found)(model)


def test_an_int8_cache_quantized_per_tensor_is_caught(c8):
    """One scale for the whole cache: written through a QuantizeLinear, but not with a scale per KV channel
    (kv_heads * head_dim), the recipe's."""
    model, found = c8
    node = next(v for v in model.graph.outputs if v.name == "present.0.key").producer().inputs[1].producer()
    while node.op_type != "QuantizeLinear":
        node = node.inputs[0].producer()
    node.replace_input_with(1, qdq.initializer(model.graph, "per_tensor.scale", np.array(0.05, np.float32)))
    node.replace_input_with(2, qdq.initializer(model.graph, "per_tensor.zero_point", np.array(0, np.int8)))
    with pytest.raises(QpassError, match=r"present\.0\.key without its quantization"):
        VerifyInt8CachePass(found)(model)


def test_an_int8_cache_output_not_written_by_a_concat_is_caught(c8):
    model, found = c8
    present = next(v for v in model.graph.outputs if v.name == "present.0.key")
    past = next(v for v in model.graph.inputs if v.name == "past_key_values.0.key")
    identity = ir.node("Identity", [past])  # the old cache handed back: int8, and not what this step wrote
    model.graph.append(identity)
    model.graph.outputs[list(model.graph.outputs).index(present)] = identity.outputs[0]
    present.name, identity.outputs[0].name = "present.0.key.written", "present.0.key"
    identity.outputs[0].dtype = ir.DataType.INT8
    with pytest.raises(QpassError, match=r"present\.0\.key without its quantization"):
        VerifyInt8CachePass(found)(model)


def test_sites_without_cache_io_check_nothing(c8):
    model, found = c8
    assert VerifyInt8CachePass([(site, None) for site, _ in found])(model).modified is False
