"""``--fa-quant`` alone on an ONNX decoder gives the int8 KV cache, as on the PyTorch path: FAQuant's K and V are
what the cache holds, so ``past_key_values.*`` / ``present.*`` become int8 with FAQuant's per-(head, dim) ``fa_k`` /
``fa_v`` scales and offsets (torch.onnx exports at opset 20, MatMul-Softmax-MatMul, and 23, ``Attention``).
Structure, numbers (against the float-cache FAQuant form the frontend wrote before, and the float model), greedy
decoding through the int8 cache, negatives, and what ONNX Runtime makes of the QDQ form (``docs/formats.md``).
onnxruntime-genai's GroupQueryAttention refuses ``--fa-quant`` (``test_frontend.py``: q after RoPE is inside the op).
"""

import collections
import json
from types import SimpleNamespace

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qpass.cli import main
from qpass.core.config import QuantConfig
from qpass.core.data import read_samples, token_windows
from qpass.core.errors import QpassError
from qpass.core.recipe import Recipe
from qpass.frontends.onnx.frontend import OnnxFrontend
from qpass.frontends.onnx.load import GENAI_CONFIG, load_decoder
from qpass.frontends.onnx.pipeline import int8_cache, quantize_model, read_sites, site_doc
from qpass.frontends.onnx.session import Runner, greedy, session
from qpass.passes.onnx.base import SITES_METADATA
from qpass.passes.onnx.insert_faquant_qdq import InsertFAQuantQDQPass
from qpass.passes.onnx.verify_int8_cache import VerifyInt8CachePass

WINDOW = 64
SMALL = ["--window", "64", "--calib-samples", "4", "--eval-windows", "4", "--batch-size", "2"]
CACHE = [f"{p}.{i}.{k}" for p in ("past_key_values", "present") for i in (0, 1) for k in ("key", "value")]
FLAGS = {"fa": ["--fa-quant"], "both": ["--fa-quant", "--kv-int8"]}
PPL_TOLERANCE_PCT = 0.1  # --fa-quant against the float model, ONNX Runtime perplexity (measured +0.003%)
LOGIT_TOLERANCE = 1e-4  # the int8 cache against the float-cache FAQuant form: the same values, other float rounding


@pytest.fixture(scope="module")
def compiled(onnx_dirs, text_files, tmp_path_factory):
    """``{(opset, "fa" | "both"): output directory}`` of ``qpass compile`` with ``--fa-quant`` (and ``--kv-int8``)."""
    base, out = tmp_path_factory.mktemp("fa-quant-cache"), {}
    for opset, flags in ((20, "fa"), (23, "fa"), (20, "both")):
        out[opset, flags] = base / f"{opset}-{flags}"
        assert (
            main(
                [
                    "compile",
                    str(onnx_dirs[opset]),
                    *FLAGS[flags],
                    "--calib",
                    str(text_files["calib"]),
                    "--eval",
                    str(text_files["prose"]),
                    "-o",
                    str(out[opset, flags]),
                    *SMALL,
                ]
            )
            == 0
        )
    return out


@pytest.fixture(scope="module")
def windows(onnx_dirs, text_files):
    tokenizer = OnnxFrontend.load(onnx_dirs[20], WINDOW).tokenizer
    return token_windows(tokenizer, read_samples(text_files["prose"], "--eval"), WINDOW, 4, "--eval")


def _float_cache_form(source, recipe: Recipe) -> ir.Model:
    """What ``--fa-quant`` alone wrote before: FAQuant's round trips on q, k and v, the cache left float."""
    model, found = load_decoder(source / "model.onnx")
    InsertFAQuantQDQPass(found, recipe)(model)
    model.metadata_props[SITES_METADATA] = json.dumps([site_doc(s, c) for s, c in found])
    return model


def _cache_quantizer(model: ir.Model, present: str) -> ir.Node:
    """The QuantizeLinear whose codes ``present`` (``Concat(past, new)``) appends, through the layout change."""
    concat = next(v for v in model.graph.outputs if v.name == present).producer()
    node = concat.inputs[1].producer()
    while node.op_type in ("Transpose", "Reshape"):
        node = node.inputs[0].producer()
    assert node.op_type == "QuantizeLinear"
    return node


# structure


@pytest.mark.parametrize("opset", [20, 23])
def test_fa_quant_alone_writes_an_int8_cache(compiled, opset):
    out = compiled[opset, "fa"]
    report = json.loads((out / "report.json").read_text())
    assert report["passes"] == {"InsertKVCacheQDQPass": 4, "FoldKVCacheScalesPass": 2, "InsertFAQuantQDQPass": 2}
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
    assert all(types[name] == onnx.TensorProto.INT8 for name in CACHE)
    assert types["logits"] == onnx.TensorProto.FLOAT


@pytest.mark.parametrize("flags, cache_kind", [("fa", "fa"), ("both", "kv")])
def test_the_cache_holds_the_recipes_scales(compiled, flags, cache_kind):
    """FAQuant alone: its ``fa_k``/``fa_v`` ``[kv_heads, head_dim]``, flattened to the cache's channels
    ``h * head_dim + d``; with ``--kv-int8`` too, C8's ``kv_k``/``kv_v`` as before."""
    out = compiled[20, flags]
    recipe, model = Recipe.load(out / "recipe"), ir.load(out / "model.onnx")
    for layer in (0, 1):
        for kind, present in (("k", f"present.{layer}.key"), ("v", f"present.{layer}.value")):
            quantize = _cache_quantizer(model, present)
            assert quantize.inputs[1].name == f"qpass.layers.{layer}.{cache_kind}_{kind}.scale"
            scale, offset = recipe.get(layer, f"{cache_kind}_{kind}")
            assert tuple(scale.shape) == ((2, 16) if cache_kind == "fa" else (32,))
            np.testing.assert_array_equal(
                quantize.inputs[1].const_value.numpy(), scale.double().flatten().float().numpy()
            )
            np.testing.assert_array_equal(
                quantize.inputs[2].const_value.numpy(), offset.flatten().numpy().astype(np.int8)
            )


def test_saturation_is_counted_on_q_k_and_v(compiled):
    report = json.loads((compiled[20, "fa"] / "report.json").read_text())
    assert {layer: set(kinds) for layer, kinds in report["saturation"]["measured"].items()} == {
        "0": {"q", "k", "v"},
        "1": {"q", "k", "v"},
    }


# numbers


@pytest.mark.parametrize("opset", [20, 23])
def test_the_int8_cache_gives_the_float_cache_forms_logits(compiled, onnx_dirs, windows, opset):
    """The int8 cache holds FAQuant's codes, which the float-cache form held as their values: the same logits."""
    out = compiled[opset, "fa"]
    recipe = Recipe.load(out / "recipe")
    before, now = _float_cache_form(onnx_dirs[opset], recipe), ir.load(out / "model.onnx")
    assert not any(v.dtype == ir.DataType.INT8 for v in before.graph.inputs)
    logits_before = Runner(session(before), read_sites(before)).logits(windows)
    logits_now = Runner(session(now), read_sites(now)).logits(windows)
    logits_float = OnnxFrontend.load(onnx_dirs[opset], WINDOW).logits()(windows)
    assert float((logits_float - logits_before).abs().max()) > 10 * LOGIT_TOLERANCE  # quantization moved them
    assert float((logits_now - logits_before).abs().max()) < LOGIT_TOLERANCE


@pytest.mark.parametrize("opset", [20, 23])
def test_perplexity_close_to_the_float_models(compiled, opset):
    evaluation = json.loads((compiled[opset, "fa"] / "report.json").read_text())["eval"]
    assert evaluation["ppl_float"] == pytest.approx(evaluation["ppl_reference"], rel=1e-6)
    assert abs(evaluation["ppl_increase_pct"]) < PPL_TOLERANCE_PCT


def test_greedy_decoding_through_the_int8_cache(compiled, onnx_dirs, windows, capsys):
    """Token by token, each step's int8 ``present.*`` fed back: the float-cache form's tokens, and ``qpass run``."""
    out = compiled[20, "fa"]
    now = ir.load(out / "model.onnx")
    runner = Runner(session(now), read_sites(now))
    prompt = windows[0, :8].tolist()
    _, past = runner.step(np.array([prompt], dtype=np.int64), None, 0)
    assert {value.dtype for value in past.values()} == {np.dtype(np.int8)}
    before = _float_cache_form(onnx_dirs[20], Recipe.load(out / "recipe"))
    assert greedy(runner, prompt, 12) == greedy(Runner(session(before), read_sites(before)), prompt, 12)
    capsys.readouterr()
    assert main(["run", str(out), "--prompt", "def main():", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def main():")


# negatives


def test_without_cache_io_fa_quant_keeps_its_round_trips(compiled, onnx_dirs):
    """A decoder with no cache I/O has no cache to make int8: q, k and v get FAQuant's round trips, nothing else."""
    model, found = load_decoder(onnx_dirs[20] / "model.onnx")
    _, counts = quantize_model(model, [(site, None) for site, _ in found], Recipe.load(compiled[20, "fa"] / "recipe"))
    assert counts == {"InsertFAQuantQDQPass": 6}
    assert not any(v.dtype == ir.DataType.INT8 for v in model.graph.inputs)


def test_a_site_without_cache_io_beside_cached_ones_is_refused(compiled, onnx_dirs):
    model, found = load_decoder(onnx_dirs[20] / "model.onnx")
    with pytest.raises(QpassError, match=r"--fa-quant: attention 1 .* has no KV cache inputs and outputs"):
        quantize_model(model, [found[0], (found[1][0], None)], Recipe.load(compiled[20, "fa"] / "recipe"))


def test_an_int8_cache_written_with_a_per_tensor_scale_is_caught(compiled, onnx_dirs):
    """The cache's scale must have one value per KV channel (``kv_heads * head_dim``), as the recipe's."""
    _, found = load_decoder(onnx_dirs[20] / "model.onnx")
    model = ir.load(compiled[20, "fa"] / "model.onnx")
    VerifyInt8CachePass(found)(model)  # as written: passes
    quantize = _cache_quantizer(model, "present.0.key")
    scalar = ir.Value(
        name="one_scale",
        type=ir.TensorType(ir.DataType.FLOAT),
        shape=ir.Shape([]),
        const_value=ir.tensor(np.array(0.05, dtype=np.float32), name="one_scale"),
    )
    model.graph.register_initializer(scalar)
    quantize.replace_input_with(1, scalar)
    with pytest.raises(QpassError, match="present.0.key without its quantization"):
        VerifyInt8CachePass(found)(model)


def test_int8_cache_means_one_thing_for_every_flag(genai_float_dir):
    """``int8_cache``: ``--kv-int8`` (static) and ``--fa-quant`` give an int8 cache, the dynamic cache alone has no
    static one; the GroupQueryAttention frontend writes genai_config.json for it by the same test."""
    assert int8_cache(QuantConfig(fa_quant=True)) and int8_cache(QuantConfig(kv_cache="static"))
    assert not int8_cache(QuantConfig(kv_cache="dynamic"))
    frontend = OnnxFrontend.load(genai_float_dir, WINDOW)
    for config in (QuantConfig(fa_quant=True), QuantConfig(kv_cache="static")):
        written = json.loads(frontend.extra_files(SimpleNamespace(config=config))[GENAI_CONFIG])
        assert written["search"]["past_present_share_buffer"] is False


# what ONNX Runtime makes of it (docs/formats.md, "ONNX Runtime and the QDQ form")


@pytest.mark.parametrize("opset", [20, 23])
def test_onnx_runtime_runs_attention_in_float_after_dequantize(compiled, opset, tmp_path):
    """ONNX Runtime (CPU provider, ORT_ENABLE_ALL) keeps the Q/DQ nodes and fuses none of them into an integer
    matmul: attention reads q through DequantizeLinear and the int8 cache through a Cast, in float32."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(compiled[opset, "fa"] / "model.onnx"), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    assert not {"QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention"} & set(
        ops
    )
    assert (ops["QuantizeLinear"], ops["DequantizeLinear"]) == (6, 2)  # K, V into the cache; q's round trip
    assert ops["Attention" if opset == 23 else "Softmax"] == 2


def test_the_passes_name_what_they_take(onnx_dirs):
    """The cache passes hold C8's or FAQuant's scales, and the FAQuant pass some of q, k and v: nothing else."""
    from qpass.passes.onnx.fold_kv_cache_scales import FoldKVCacheScalesPass
    from qpass.passes.onnx.insert_kv_cache_qdq import InsertKVCacheQDQPass

    _, found = load_decoder(onnx_dirs[20] / "model.onnx")
    for make in (
        lambda: InsertKVCacheQDQPass(found, None, "w8a8"),
        lambda: FoldKVCacheScalesPass(found, None, "q"),
        lambda: InsertFAQuantQDQPass(found, None, ()),
        lambda: InsertFAQuantQDQPass(found, None, ("o",)),
    ):
        with pytest.raises(ValueError):
            make()
