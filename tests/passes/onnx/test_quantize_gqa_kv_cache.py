"""QuantizeGQAKVCachePass (qpass/passes/onnx/quantize_gqa_kv_cache.py): C8 through GroupQueryAttention's int8 cache
on onnxruntime-genai models: the rewrite, its numbers in ONNX Runtime and onnxruntime-genai, the builder's own int8
model as the reference, an asymmetric recipe through the centring, and refusals. The sites: test_find_gqa_sites.py;
the centring alone: test_gqa_centre.py.

The checker is not run: the builder's graphs hold ONNX Runtime ops (SimplifiedLayerNormalization, ...) in the
default domain, which ``onnx.checker`` rejects even in the builder's own output, so an ONNX Runtime session
is the check.
"""

import json
import shutil

import numpy as np
import onnx_ir as ir
import pytest
import torch

from qpass.core.errors import QpassError
from qpass.core.int8 import affine_qparams, quantize
from qpass.passes.onnx.quantize_gqa_kv_cache import (
    GQAKVScales,
    QuantizeGQAKVCachePass,
    int8_kv_genai_config,
    write_int8_kv_genai_config,
)
from tests.helpers.onnx_genai_cases import (
    absmax_scales,
    cache_io,
    empty_cache,
    forward,
    greedy,
    run_builder_int8,
    session,
)

HEAD_DIM, KV_HEADS, LAYERS = 16, 2, 2  # conftest's tiny Llama
VOCAB = 49152
# max |int8 logits - float logits| over the float logits' largest magnitude: measured 0.5% on the prompt below
# with these scales, 1.1% with twice the scales, 17% with half of them (a clipped cache)
LOGIT_TOLERANCE = 0.02


@pytest.fixture(scope="module")
def float_model(genai_float_dir):
    return ir.load(genai_float_dir / "model.onnx")


@pytest.fixture(scope="module")
def float_sess(genai_float_dir):
    return session(genai_float_dir / "model.onnx")


@pytest.fixture(scope="module")
def scales(float_sess):
    """Per-channel absmax / 127 of each layer's present K and V over 4 x 128 calibration tokens (other tokens
    than the prompt's)."""
    calib = np.random.default_rng(1).integers(0, VOCAB, (4, 128))
    return absmax_scales(float_sess, calib, HEAD_DIM)


@pytest.fixture(scope="module")
def prompt():
    return np.random.default_rng(2).integers(0, VOCAB, (1, 24))


def quantized(model_dir, scales) -> tuple[ir.Model, QuantizeGQAKVCachePass]:
    model = ir.load(model_dir / "model.onnx")
    rewrite = QuantizeGQAKVCachePass([GQAKVScales(k, v) for k, v in zip(*scales, strict=True)])
    assert rewrite(model).modified
    return model, rewrite


@pytest.fixture(scope="module")
def ours_dir(genai_float_dir, scales, tmp_path_factory):
    """The float directory with our rewrite: model, external data, genai_config.json, tokenizer."""
    out = tmp_path_factory.mktemp("ours") / "int8"
    shutil.copytree(genai_float_dir, out, ignore=shutil.ignore_patterns("model.onnx", "model.onnx.data"))
    model, _ = quantized(genai_float_dir, scales)
    ir.save(model, out / "model.onnx", external_data="model.onnx.data")
    assert write_int8_kv_genai_config(genai_float_dir / "genai_config.json", out / "genai_config.json")
    return out


@pytest.fixture(scope="module")
def ours_sess(ours_dir):
    return session(ours_dir / "model.onnx")


@pytest.fixture(scope="module")
def builder_int8_dir(tiny_model_dir, scales, tmp_path_factory):
    """onnxruntime-genai's builder's own int8 per-channel model, fed the same scales."""
    return run_builder_int8(tiny_model_dir, tmp_path_factory.mktemp("builder-int8") / "int8", *scales)


def gqa_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]


# ---- structure -------------------------------------------------------------------------------------------


def test_rewrite_structure(genai_float_dir, float_model, scales):
    model, rewrite = quantized(genai_float_dir, scales)
    assert rewrite.count == LAYERS
    assert len(list(model.graph)) == len(list(float_model.graph))  # attributes and inputs only: no new nodes
    for layer, (node, before) in enumerate(zip(gqa_nodes(model), gqa_nodes(float_model), strict=True)):
        assert node.attributes["k_quant_type"].value == node.attributes["v_quant_type"].value == "PER_CHANNEL"
        assert node.attributes["kv_cache_bit_width"].value == 8
        assert [v.name if v else None for v in node.inputs[:12]] == [v.name if v else None for v in before.inputs[:12]]
        for port, expected in ((12, scales[0][layer]), (13, scales[1][layer])):
            value = node.inputs[port]
            assert value.is_initializer() and value.dtype == ir.DataType.FLOAT and value.shape == [KV_HEADS * HEAD_DIM]
            np.testing.assert_array_equal(value.const_value.numpy(), expected)
    io = (*model.graph.inputs, *model.graph.outputs)
    cache = [v for v in io if v.name.startswith(("past_key_values.", "present."))]
    assert len(cache) == 4 * LAYERS and {v.dtype for v in cache} == {ir.DataType.INT8}
    others = [v for v in io if v not in cache]
    assert {v.name: v.dtype for v in others} == {
        "input_ids": ir.DataType.INT64,
        "attention_mask": ir.DataType.INT64,
        "logits": ir.DataType.FLOAT,
    }
    again = rewrite(model)  # the same cache again: nothing to change
    assert not again.modified and rewrite.count == LAYERS


def test_genai_config_as_the_builder_writes_it(genai_float_dir, ours_dir, builder_int8_dir):
    float_config = json.loads((genai_float_dir / "genai_config.json").read_text())
    assert float_config["search"]["past_present_share_buffer"] is True
    ours = json.loads((ours_dir / "genai_config.json").read_text())
    assert ours == json.loads((builder_int8_dir / "genai_config.json").read_text())
    assert ours == int8_kv_genai_config(float_config) and ours["search"]["past_present_share_buffer"] is False


def test_same_graph_as_the_builders_int8_model(ours_dir, builder_int8_dir, ours_sess, prompt):
    """The builder's own int8 output (same scales) and ours: same attributes, inputs, cache types, logits."""
    ours, theirs = ir.load(ours_dir / "model.onnx"), ir.load(builder_int8_dir / "model.onnx")
    for a, b in zip(gqa_nodes(ours), gqa_nodes(theirs), strict=True):
        assert {k: v.value for k, v in a.attributes.items()} == {k: v.value for k, v in b.attributes.items()}
        assert len(a.inputs) == len(b.inputs) == 14
        assert [v.name if v else None for v in a.inputs[:12]] == [v.name if v else None for v in b.inputs[:12]]
        for port in (12, 13):
            np.testing.assert_array_equal(a.inputs[port].const_value.numpy(), b.inputs[port].const_value.numpy())

    def io(model):
        return {v.name: (v.dtype, str(v.shape)) for v in (*model.graph.inputs, *model.graph.outputs)}

    assert io(ours) == io(theirs)
    theirs_sess = session(builder_int8_dir / "model.onnx")
    np.testing.assert_array_equal(
        forward(ours_sess, prompt, empty_cache(ours_sess, HEAD_DIM))[0],
        forward(theirs_sess, prompt, empty_cache(theirs_sess, HEAD_DIM))[0],
    )


# ---- numbers -----------------------------------------------------------------------------------------------


def reference_int8(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``[B, H, S, D]`` float -> int8 with per-channel ``scale [H * D]``, as the kernel rounds (half to even)."""
    inv = (np.float32(1) / scale.reshape(1, x.shape[1], 1, x.shape[3])).astype(np.float32)
    return np.clip(np.rint(x * inv), -128, 127).astype(np.int8)


def test_int8_cache_holds_the_scaled_values(float_sess, ours_sess, scales, prompt):
    """Layer 0's K/V enter the cache as round(x / scale) with our channel layout (h * head_dim + d); the
    same scales reversed along the channels give a different cache, so the check can fail."""
    _, float_past = forward(float_sess, prompt, empty_cache(float_sess, HEAD_DIM))
    _, int8_past = forward(ours_sess, prompt, empty_cache(ours_sess, HEAD_DIM))
    for side, scale in (("key", scales[0][0]), ("value", scales[1][0])):
        name = f"past_key_values.0.{side}"
        got, x = int8_past[name], float_past[name]
        assert got.dtype == np.int8 and got.shape == x.shape
        diff = np.abs(got.astype(np.int32) - reference_int8(x, scale))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.999  # 1 LSB where float sums differ at a half
        wrong = np.abs(got.astype(np.int32) - reference_int8(x, scale[::-1].copy()))
        assert (wrong > 1).mean() > 0.1


def test_logits_close_to_float(genai_float_dir, float_sess, ours_sess, scales, prompt, tmp_path):
    """Prefill logits within the tolerance of the float model's; half the scales (a clipped cache) are not."""
    float_logits, _ = forward(float_sess, prompt, empty_cache(float_sess, HEAD_DIM))

    def error(sess):
        logits, _ = forward(sess, prompt, empty_cache(sess, HEAD_DIM))
        return np.abs(logits - float_logits).max() / np.abs(float_logits).max()

    assert 0 < error(ours_sess) < LOGIT_TOLERANCE
    clipped, _ = quantized(genai_float_dir, ([k / 2 for k in scales[0]], [v / 2 for v in scales[1]]))
    ir.save(clipped, tmp_path / "model.onnx", external_data="model.onnx.data")
    assert error(session(tmp_path / "model.onnx")) > 3 * LOGIT_TOLERANCE


def test_greedy_decode_feeds_the_int8_cache_back(float_sess, ours_sess, prompt):
    """16 greedy steps, the int8 present fed back as past each step: the float model's tokens, and each
    step's logits within the tolerance of the float model's on the same tokens."""
    steps = 16
    tokens, int8_logits = greedy(ours_sess, prompt, steps, HEAD_DIM)
    float_tokens, float_logits = greedy(float_sess, prompt, steps, HEAD_DIM)
    assert tokens == float_tokens
    for a, b in zip(int8_logits, float_logits, strict=True):
        assert np.abs(a - b).max() < LOGIT_TOLERANCE * np.abs(b).max()
    _, past = forward(ours_sess, prompt, empty_cache(ours_sess, HEAD_DIM))
    _, past = forward(ours_sess, np.array([[tokens[0]]]), past)
    names, _ = cache_io(ours_sess)
    assert all(past[n].dtype == np.int8 and past[n].shape[2] == prompt.shape[1] + 1 for n in names)


def test_onnxruntime_genai_generates(ours_dir, ours_sess, prompt):
    """og.Model runs the rewritten directory and generates the tokens of our own ONNX Runtime decode loop."""
    import onnxruntime_genai as og

    steps = 12
    model = og.Model(str(ours_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.shape[1] + steps, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt[0].astype(np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    generated = [int(t) for t in generator.get_sequence(0)[prompt.shape[1] :]]
    assert generated == greedy(ours_sess, prompt, steps, HEAD_DIM)[0]


def test_centred_int8_cache_holds_the_asymmetric_codes(genai_float_dir, float_sess, scales, prompt, tmp_path):
    """Through the pass with an asymmetric recipe's scale and offset, layer 0's int8 cache holds
    ``round(x / scale) + offset`` (qpass's asymmetric codes; later layers read the int8 layers before them), and
    the logits are within the tolerance of the float model's."""
    _, calib_past = forward(
        float_sess, np.random.default_rng(1).integers(0, VOCAB, (4, 128)), empty_cache(float_sess, HEAD_DIM, 4)
    )
    affine = []
    for layer in range(LAYERS):
        per_kind = []
        for side in ("key", "value"):
            x = calib_past[f"past_key_values.{layer}.{side}"]
            lo, hi = x.min(axis=(0, 2)).reshape(-1), x.max(axis=(0, 2)).reshape(-1)
            scale, offset = affine_qparams(torch.from_numpy(lo), torch.from_numpy(hi), symmetric=False)
            per_kind.append((scale.numpy(), offset.numpy()))
        affine.append(per_kind)
    model = ir.load(genai_float_dir / "model.onnx")
    rewrite = QuantizeGQAKVCachePass([GQAKVScales.from_affine(k, v, centred=True) for k, v in affine])
    assert rewrite(model).modified and rewrite.count == LAYERS
    assert not rewrite(model).modified  # a second run changes nothing
    ir.save(model, tmp_path / "model.onnx", external_data="model.onnx.data")
    sess = session(tmp_path / "model.onnx")
    want, float_past = forward(float_sess, prompt, empty_cache(float_sess, HEAD_DIM))
    got, int8_past = forward(sess, prompt, empty_cache(sess, HEAD_DIM))
    for side, (scale, offset) in zip(("key", "value"), affine[0], strict=True):
        name = f"past_key_values.0.{side}"
        codes = quantize(
            torch.from_numpy(float_past[name]),
            torch.from_numpy(scale).reshape(1, KV_HEADS, 1, HEAD_DIM),
            torch.from_numpy(offset).reshape(1, KV_HEADS, 1, HEAD_DIM),
        ).numpy()
        diff = np.abs(int8_past[name].astype(np.int32) - codes)
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99, name  # 1 LSB where x / scale is near a half
    error = np.abs(got - want).max() / np.abs(want).max()
    assert 0 < error < LOGIT_TOLERANCE


# ---- negatives ---------------------------------------------------------------------------------------------


def test_no_gqa_node_is_named():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 4]))
    node = ir.node("Relu", [x])
    node.outputs[0].name = "y"
    model = ir.Model(ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 20}), ir_version=10)
    with pytest.raises(QpassError, match="no com.microsoft.GroupQueryAttention node"):
        QuantizeGQAKVCachePass([])(model)


@pytest.mark.parametrize("bad", [np.nan, np.inf, 0.0, -0.1, 1e-46])
def test_non_finite_or_non_positive_scale_is_refused(bad):
    scale = np.full(KV_HEADS * HEAD_DIM, 0.05, np.float32)
    scale[3] = bad
    with pytest.raises(QpassError, match="channel 3"):
        GQAKVScales(scale, np.full_like(scale, 0.05))


def test_wrong_scales_leave_the_model_untouched(genai_float_dir, scales):
    model = ir.load(genai_float_dir / "model.onnx")
    good = [GQAKVScales(k, v) for k, v in zip(*scales, strict=True)]
    short = GQAKVScales(scales[0][1][:-1], scales[1][1][:-1])
    with pytest.raises(QpassError, match=r"expected kv_num_heads \* head_dim = 2 \* 16 = 32"):
        QuantizeGQAKVCachePass([good[0], short])(model)
    with pytest.raises(QpassError, match="1 layers of scales for 2 GroupQueryAttention nodes"):
        QuantizeGQAKVCachePass(good[:1])(model)
    with pytest.raises(QpassError, match="shape"):
        GQAKVScales(scales[0][0].reshape(KV_HEADS, HEAD_DIM), scales[1][0])
    assert all("kv_cache_bit_width" not in n.attributes and len(n.inputs) == 12 for n in gqa_nodes(model))
    assert {v.dtype for v in model.graph.inputs if v.name.startswith("past_key_values.")} == {ir.DataType.FLOAT}


def test_an_int8_model_with_other_scales_is_refused(builder_int8_dir, scales):
    model = ir.load(builder_int8_dir / "model.onnx")
    other = [GQAKVScales(k * 2, v * 2) for k, v in zip(*scales, strict=True)]
    with pytest.raises(QpassError, match="already has a quantized KV cache"):
        QuantizeGQAKVCachePass(other)(model)
