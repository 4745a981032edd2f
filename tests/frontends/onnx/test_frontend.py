"""The ONNX frontend on tiny decoders exported with torch.onnx (opset 20: MatMul-Softmax-MatMul; 23: Attention):
sites (structure and negatives), calibration against the PyTorch path, the C8 / FAQuant rewrite run in ONNX Runtime
(numbers, batch sizes, greedy decoding on the int8 cache), and the CLI end to end with its bad inputs."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from qpass.cli import main
from qpass.core.calibrate import calibrate
from qpass.core.config import QuantConfig
from qpass.core.data import read_samples, token_windows
from qpass.core.errors import QpassError
from qpass.frontends.onnx.frontend import OnnxFrontend
from qpass.frontends.onnx.load import load_decoder
from qpass.frontends.onnx.pipeline import read_sites
from qpass.frontends.onnx.session import Runner, greedy, session
from qpass.frontends.torch_export.frontend import TorchExportFrontend
from qpass.passes.onnx.find_gqa_sites import gqa_nodes
from qpass.passes.onnx.gqa_centre import COS_CACHE, SIN_CACHE, rotary_frequencies
from qpass.passes.onnx.qdq import initializer

WINDOW = 64
SMALL = ["--window", "64", "--calib-samples", "4", "--eval-windows", "4", "--batch-size", "2"]
MODES = {
    "C8": dict(kv_cache="static"),
    "FAQuant": dict(fa_quant=True),
    "FAQuant+C8": dict(fa_quant=True, kv_cache="static"),
}


@pytest.fixture(scope="module")
def windows(onnx_dirs, text_files):
    tokenizer = OnnxFrontend.load(onnx_dirs[20], WINDOW).tokenizer
    return token_windows(tokenizer, read_samples(text_files["calib"], "--calib"), WINDOW, 4, "--calib")


@pytest.fixture(scope="module")
def torch_frontend(tiny_model_dir):
    return TorchExportFrontend.load(str(tiny_model_dir), WINDOW)


def _digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# structure


@pytest.mark.parametrize("opset, form", [(20, "matmul-softmax-matmul"), (23, "onnx-attention")])
def test_sites_and_cache_io_are_found(onnx_dirs, opset, form):
    model, found = load_decoder(onnx_dirs[opset] / "model.onnx")
    assert [(s.layer, s.form, s.num_heads, s.num_kv_heads, s.head_dim, s.rope) for s, _ in found] == [
        (0, form, 4, 2, 16, True),
        (1, form, 4, 2, 16, True),
    ]
    for site, cache in found:
        assert (cache.past_key, cache.present_value) == (
            f"past_key_values.{site.layer}.key",
            f"present.{site.layer}.value",
        )
        values = {v.name: v for node in model.graph for v in node.outputs}
        assert values[site.k].shape[1] == 2 and values[site.q].shape[1] == 4  # k before GQA's repeat, q per head


def test_sites_are_found_whatever_the_values_are_called(onnx_dirs, tmp_path):
    model = ir.load(onnx_dirs[20] / "model.onnx")
    outputs = {v.name for v in model.graph.outputs}
    for i, node in enumerate(model.graph):
        node.name = f"n{i}"
        for j, value in enumerate(node.outputs):
            if value.name not in outputs:
                value.name = f"v{i}_{j}"
    ir.save(model, tmp_path / "model.onnx")
    _, found = load_decoder(tmp_path / "model.onnx")
    assert len(found) == 2 and all(cache is not None for _, cache in found)


def test_a_graph_without_attention_is_refused_with_the_closest_miss(tmp_path):
    from qpass.models.tiny import NoAttention

    path = tmp_path / "mlp.onnx"
    torch.onnx.export(
        NoAttention(),
        (torch.zeros(1, 4, dtype=torch.long),),
        str(path),
        dynamo=True,
        opset_version=20,
        input_names=["input_ids"],
        output_names=["logits"],
        verbose=False,
    )
    with pytest.raises(QpassError, match="found no attention"):
        load_decoder(path)


def test_opset_below_17_and_no_token_input_are_refused(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    for opset, message in ((16, "opset 16"), (20, "no input_ids input")):
        onnx.save(
            onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)]), tmp_path / "m.onnx"
        )
        with pytest.raises(QpassError, match=message):
            load_decoder(tmp_path / "m.onnx")


# numbers


@pytest.mark.parametrize("opset", [20, 23])
def test_float_onnx_matches_the_pytorch_model(onnx_dirs, torch_frontend, windows, opset):
    frontend = OnnxFrontend.load(onnx_dirs[opset], WINDOW)
    ours = frontend.logits()(windows)
    torch.testing.assert_close(ours, torch_frontend.logits()(windows), atol=2e-5, rtol=1e-4)
    ppl_onnx, ppl_torch = frontend.reference_perplexity(windows, 2), torch_frontend.reference_perplexity(windows, 2)
    assert abs(ppl_onnx / ppl_torch - 1) < 5e-4  # the 0.05%


@pytest.mark.parametrize("mode", sorted(MODES))
def test_same_scales_as_the_pytorch_path(onnx_dirs, torch_frontend, windows, mode):
    config = QuantConfig(**MODES[mode])
    ours = calibrate(OnnxFrontend.load(onnx_dirs[20], WINDOW), windows, config, batch_size=2)
    theirs = calibrate(torch_frontend, windows, config, batch_size=2)
    assert set(ours.tensors) == set(theirs.tensors)
    for name, tensor in theirs.tensors.items():
        if name.endswith("scale"):
            assert float((ours.tensors[name] / tensor - 1).abs().max()) < 0.01, name
        else:
            assert float((ours.tensors[name] - tensor).abs().max()) <= 1, name


@pytest.mark.parametrize("opset", [20, 23])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_quantized_onnx_runs_the_pytorch_paths_numbers(onnx_dirs, torch_frontend, windows, opset, mode):
    """The PyTorch path's recipe applied to the export: ONNX Runtime's logits are the fake-quantized program's."""
    config = QuantConfig(**MODES[mode])
    recipe = calibrate(torch_frontend, windows, config, batch_size=2)
    frontend = OnnxFrontend.load(onnx_dirs[opset], WINDOW)
    quantized, counts = frontend.apply(recipe)
    both = bool(config.kv_cache and config.fa_quant)  # FAQuant then quantizes C8's dequantized cache: no fold
    fa = {"InsertFAQuantQDQPass": 6 if config.kv_cache else 2} if config.fa_quant else {}  # alone: q (its own cache)
    assert counts == {"InsertKVCacheQDQPass": 4, **({} if both else {"FoldKVCacheScalesPass": 2}), **fa}
    ops = {node.op_type for node in quantized.graph}
    assert ("DequantizeLinear" in ops) == bool(config.fa_quant)  # a folded cache is read through a Cast
    with torch.no_grad():
        expected = torch_frontend.logits(recipe)(windows)
    got = Runner(session(quantized), read_sites(quantized)).logits(windows)
    with torch.no_grad():
        float_gap = float((torch_frontend.logits()(windows) - expected).abs().max())
    assert float_gap > 1e-4  # quantization moved the logits, so the comparison below can fail
    assert float((got - expected).abs().max()) < float_gap / 10


def test_the_int8_cache_io_and_any_batch_size(onnx_dirs, torch_frontend, windows):
    recipe = calibrate(torch_frontend, windows, QuantConfig(**MODES["C8"]))
    quantized, _ = OnnxFrontend.load(onnx_dirs[20], WINDOW).apply(recipe)
    types = {v.name: v.dtype for v in (*quantized.graph.inputs, *quantized.graph.outputs)}
    assert all(
        types[f"{p}.{i}.{k}"] == ir.DataType.INT8
        for p in ("past_key_values", "present")
        for i in (0, 1)
        for k in ("key", "value")
    )
    assert types["logits"] == ir.DataType.FLOAT
    runner = Runner(session(quantized), read_sites(quantized))
    together = runner.logits(windows[:3])
    one_by_one = torch.cat([runner.logits(windows[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_greedy_decode_on_the_int8_cache_gives_the_pytorch_paths_tokens(onnx_dirs, torch_frontend, windows, mode):
    """ONNX Runtime decodes token by token, feeding int8 present.* back as past_key_values.*; the PyTorch path's
    quantized program recomputes the whole sequence each step. Static per-channel int8 is per element, so both
    see the same values and choose the same tokens."""
    recipe = calibrate(torch_frontend, windows, QuantConfig(**MODES[mode]))
    quantized, _ = OnnxFrontend.load(onnx_dirs[20], WINDOW).apply(recipe)
    prompt = windows[0, :8].tolist()
    ours = greedy(Runner(session(quantized), read_sites(quantized)), prompt, 12)
    program, ids = torch_frontend.logits(recipe), list(prompt)
    for _ in range(12):  # the program is captured for WINDOW tokens; attention is causal, so padding after is inert
        padded = torch.tensor([ids + [0] * (WINDOW - len(ids))])
        ids.append(int(program(padded)[0, len(ids) - 1].argmax()))
    assert ours == ids[len(prompt) :]


def test_the_rewritten_model_passes_the_full_checker(onnx_dirs, torch_frontend, windows):
    recipe = calibrate(torch_frontend, windows, QuantConfig(**MODES["FAQuant+C8"]))
    quantized, _ = OnnxFrontend.load(onnx_dirs[23], WINDOW).apply(recipe)
    onnx.checker.check_model(ir.to_proto(quantized), full_check=True)


# the command line


@pytest.fixture(scope="module")
def compiled_onnx(onnx_dirs, text_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-compiled") / "out"
    before = _digest(onnx_dirs[20])
    assert (
        main(
            [
                "compile",
                str(onnx_dirs[20] / "model.onnx"),
                "--kv-int8",
                "--fa-quant",
                "--calib",
                str(text_files["calib"]),
                "--eval",
                str(text_files["prose"]),
                "-o",
                str(out),
                *SMALL,
            ]
        )
        == 0
    )
    assert _digest(onnx_dirs[20]) == before  # the input is never modified
    return out


def test_compile_writes_the_onnx_directory(compiled_onnx):
    for name in (
        "model.onnx",
        "recipe/recipe.json",
        "recipe/recipe.safetensors",
        "report.json",
        "report.txt",
        "tokenizer.json",
    ):
        assert (compiled_onnx / name).is_file(), name
    report = json.loads((compiled_onnx / "report.json").read_text())
    assert report["model"]["frontend"] == "onnx" and report["model"]["checker_full"] is True
    assert report["passes"] == {"InsertKVCacheQDQPass": 4, "InsertFAQuantQDQPass": 6}
    assert abs(report["eval"]["ppl_float"] / report["eval"]["ppl_reference"] - 1) < 1e-6
    assert set(report["saturation"]["measured"]["0"]) == {"q", "k", "v"}
    onnx.checker.check_model(str(compiled_onnx / "model.onnx"), full_check=True)


def test_eval_and_run_read_the_directory_back(compiled_onnx, text_files, capsys):
    report = json.loads((compiled_onnx / "report.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(compiled_onnx), "--eval", str(text_files["prose"]), "--eval-windows", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ppl_quant"] == pytest.approx(report["eval"]["ppl_quant"], rel=1e-6)
    assert main(["run", str(compiled_onnx), "--prompt", "def main():", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def main():")


def test_inspect_lists_the_onnx_sites(onnx_dirs, capsys):
    assert main(["inspect", str(onnx_dirs[23]), "--json"]) == 0
    sites = json.loads(capsys.readouterr().out)
    assert [(s["form"], s["num_kv_heads"]) for s in sites] == [("onnx-attention", 2)] * 2


def test_external_data_in_and_out(tiny_model_dir, text_files, tmp_path):
    from tests.helpers.onnx_cases import export_dir

    source = export_dir(tiny_model_dir, tmp_path / "ext", 20, external_data=True)
    assert any(p.suffix == ".data" for p in source.iterdir())
    out = tmp_path / "out"
    assert main(["compile", str(source), "--kv-int8", "--calib", str(text_files["calib"]), "-o", str(out), *SMALL]) == 0
    assert (out / "model.onnx.data").is_file() and (out / "model.onnx").stat().st_size < 1_000_000
    quantized = ir.load(out / "model.onnx")
    assert quantized.graph.inputs[3].dtype == ir.DataType.INT8


def test_external_weights_stay_in_the_input_file_until_written(tiny_model_dir, text_files, tmp_path):
    """The passes never read an ONNX input's external weights (they only add Q/DQ and scales): every external tensor of
    the compiled model still points into the input's data file, so the writer copies the weights one tensor at a time
    (onnx-ir's external-data writer), and the whole model is never held by qpass itself."""
    import qpass
    from tests.helpers.onnx_cases import export_dir

    source = export_dir(tiny_model_dir, tmp_path / "ext", 20, external_data=True)
    before = {
        name: v.const_value
        for name, v in ir.load(source / "model.onnx").graph.initializers.items()
        if isinstance(v.const_value, ir.ExternalTensor)
    }
    assert before
    config = QuantConfig(kv_cache="static")
    run = qpass.RunSettings(window=64, calib_samples=4, batch_size=2)
    result = qpass.compile(str(source), config, calib=str(text_files["calib"]), run=run)
    after = {name: v.const_value for name, v in result.program.graph.initializers.items()}
    for name, tensor in before.items():
        kept = after[name]
        assert isinstance(kept, ir.ExternalTensor), name
        assert Path(kept.path).resolve() == Path(tensor.path).resolve() and kept.offset == tensor.offset, name
    out = result.save(tmp_path / "out")
    written = ir.load(out / "model.onnx")
    for name, tensor in before.items():
        np.testing.assert_array_equal(written.graph.initializers[name].const_value.numpy(), tensor.numpy())


def _bad_inputs(source: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments after `compile`, what the one-line error says)."""
    data = (source / "model.onnx").read_bytes()
    truncated = tmp / "truncated"
    truncated.mkdir(parents=True)
    (truncated / "model.onnx").write_bytes(data[: len(data) // 3])
    garbage = tmp / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffnot a model" * 100)
    ext = tmp / "ext"
    ext.mkdir()
    model = ir.load(source / "model.onnx")
    ir.save(model, ext / "model.onnx", external_data="model.onnx.data")
    (ext / "model.onnx.data").unlink()
    other_tokenizer = tmp / "tok"
    from transformers import AutoTokenizer

    small = AutoTokenizer.from_pretrained(source)
    small.save_pretrained(other_tokenizer)
    cut = tmp / "cut"
    shutil.copytree(source, cut)
    vocab_model = ir.load(cut / "model.onnx")
    next(v for v in vocab_model.graph.outputs if v.name == "logits").shape = ir.Shape(["batch", "sequence", 100])
    ir.save(vocab_model, cut / "model.onnx")
    model_path = str(source / "model.onnx")
    return {
        "truncated": ([str(truncated / "model.onnx"), "--kv-int8"], "truncated or corrupt"),
        "garbage": ([str(garbage), "--kv-int8"], "truncated or corrupt"),
        "missing external data": ([str(ext / "model.onnx"), "--kv-int8"], "external data"),
        "missing file": ([str(tmp / "nothing.onnx"), "--kv-int8"], "no such ONNX file"),
        "tokenizer does not match": ([str(cut / "model.onnx"), "--kv-int8"], "the tokenizer has"),
        "no tokenizer": ([model_path, "--kv-int8", "--tokenizer", str(tmp / "none")], "cannot load"),
        "w8a8": ([model_path, "--w8a8"], "--w8a8"),
        "dynamic cache": ([model_path, "--kv-int8", "dynamic"], "--kv-int8 dynamic"),
        "mindie format": ([model_path, "--kv-int8", "--format", "mindie"], "an ONNX input is written as ONNX"),
    }


def test_bad_onnx_input_is_one_line_exit_2_nothing_written_input_unchanged(onnx_dirs, text_files, tmp_path, capsys):
    cases = _bad_inputs(onnx_dirs[20], tmp_path / "inputs")
    before = _digest(tmp_path / "inputs"), _digest(onnx_dirs[20])
    for name, (args, message) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        capsys.readouterr()
        assert main(["compile", *args, "--calib", str(text_files["calib"]), "-o", str(out), *SMALL]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, (name, err)
        assert not out.exists(), name
    assert (_digest(tmp_path / "inputs"), _digest(onnx_dirs[20])) == before


def test_two_compiles_write_the_same_bytes(onnx_dirs, text_files, tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert (
            main(
                [
                    "compile",
                    str(onnx_dirs[20]),
                    "--kv-int8",
                    "--calib",
                    str(text_files["calib"]),
                    "-o",
                    str(out),
                    *SMALL,
                ]
            )
            == 0
        )
    a, b = (_digest(out) for out in outs)
    for name in ("model.onnx", "recipe/recipe.json", "recipe/recipe.safetensors"):
        assert a[name] == b[name], name


# onnxruntime-genai's builder output (GroupQueryAttention, RoPE fused inside)


@pytest.fixture(scope="module", params=[["--symmetric"], []], ids=["symmetric", "centred"])
def compiled_genai(genai_float_dir, text_files, tmp_path_factory, request):
    """The builder's model through ``--kv-int8 --symmetric`` (the builder's own form) and ``--kv-int8`` (an
    asymmetric recipe: K and V centred in the graph before the symmetric cache)."""
    out = tmp_path_factory.mktemp("genai-compiled") / "out"
    before = _digest(genai_float_dir)
    assert (
        main(
            [
                "compile",
                str(genai_float_dir),
                "--kv-int8",
                *request.param,
                "--calib",
                str(text_files["calib"]),
                "--eval",
                str(text_files["prose"]),
                "-o",
                str(out),
                *SMALL,
            ]
        )
        == 0
    )
    assert _digest(genai_float_dir) == before
    return out


def test_a_genai_model_compiles_to_a_directory_onnxruntime_genai_runs(compiled_genai):
    import onnxruntime_genai as og

    from qpass.exporters.onnx_format import load

    report = json.loads((compiled_genai / "report.json").read_text())
    centred = {} if report["config"]["symmetric"] else {"GQA K/V centred": 2}
    assert report["passes"] == {"QuantizeGQAKVCachePass": 2, **centred} and report["model"]["genai"] is True
    assert abs(report["eval"]["ppl_increase_pct"]) < 1.0
    assert (
        json.loads((compiled_genai / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is False
    )
    loaded = load(compiled_genai, "run")
    prompt = loaded.tokenizer("def main():")["input_ids"]
    ours = OnnxFrontend.generate(loaded.program, prompt, 10, None)
    model = og.Model(str(compiled_genai))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 10, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(prompt, dtype=np.int32))
    theirs = []
    while not generator.is_done():
        generator.generate_next_token()
        theirs.append(int(generator.get_next_tokens()[0]))
    assert theirs[:10] == ours


def test_max_context_reads_the_rope_of_groupqueryattention_from_its_tables(
    genai_float_dir, onnx_dirs, torch_frontend, text_files
):
    """GroupQueryAttention's cos/sin tables give the frequencies the PyTorch model's rotary embedding has, and
    ``--max-context`` widens the K cache's ranges from them as on the PyTorch path (V's are unchanged); the
    torch.onnx exports' RoPE is not read, so there it is refused in one line."""
    genai = OnnxFrontend.load(genai_float_dir, WINDOW)
    assert torch.allclose(genai.rotary(), torch_frontend.rotary(), rtol=1e-5, atol=0)
    ids = token_windows(genai.tokenizer, read_samples(text_files["calib"], "--calib"), WINDOW, 4, "--calib")
    plain, wide = (
        calibrate(genai, ids, QuantConfig(kv_cache="static", max_context=context), batch_size=2)
        for context in (None, 4 * WINDOW)
    )
    for layer in (0, 1):
        (s, o), (ws, wo) = plain.get(layer, "kv_k"), wide.get(layer, "kv_k")
        lo, hi, wlo, whi = (-128 - o) * s, (127 - o) * s, (-128 - wo) * ws, (127 - wo) * ws
        within_a_step = (wlo <= lo + s).all() and (whi >= hi - s).all()  # the offset rounds to a step
        assert bool(within_a_step and ((whi - wlo) > 1.01 * (hi - lo)).any())
        assert torch.equal(plain.get(layer, "kv_v")[0], wide.get(layer, "kv_v")[0])
    # what qpass cannot say gives None: an interleaved layout, a layer of other tables, tables not p * frequency
    last = gqa_nodes(genai.model.graph)[-1]
    last.attributes["rotary_interleaved"] = ir.AttrInt64("rotary_interleaved", 1)
    assert rotary_frequencies(genai.model) is None
    del last.attributes["rotary_interleaved"]
    cos, sin = (last.inputs[i].const_value.numpy() for i in (COS_CACHE, SIN_CACHE))
    angle = np.arctan2(sin, cos)
    last.replace_input_with(COS_CACHE, initializer(genai.model.graph, "test.cos2", np.cos(2 * angle)))
    assert rotary_frequencies(genai.model) is None  # this layer's frequencies are twice the others'
    squared = [initializer(genai.model.graph, f"test.{f.__name__}", f(angle**2)) for f in (np.cos, np.sin)]
    for gqa in gqa_nodes(genai.model.graph):  # every layer alike, but the angle grows as p^2
        gqa.replace_input_with(COS_CACHE, squared[0])
        gqa.replace_input_with(SIN_CACHE, squared[1])
    assert rotary_frequencies(genai.model) is None
    exported = OnnxFrontend.load(onnx_dirs[20], WINDOW)
    assert exported.rotary() is None
    with pytest.raises(QpassError, match="--max-context 256: qpass reads no RoPE frequencies from this model"):
        calibrate(exported, ids, QuantConfig(kv_cache="static", max_context=256), batch_size=2)


def test_saturation_reads_groupqueryattention_codes_as_the_recipes(compiled_genai):
    """The int8 ``present.*`` GroupQueryAttention writes holds the recipe's own codes (the graph centres an asymmetric
    recipe's K and V, gqa_centre): a code is counted at a limit where it is -128 or 127, whatever the channel's offset
    (counting ``code * scale`` against the offset flagged 2-4% of SmolLM2's held-out values, 0.01% on the PyTorch
    path's same windows)."""
    from qpass.core import saturation
    from qpass.exporters.onnx_format import load
    from qpass.frontends.onnx.frontend import _count_updates

    loaded = load(compiled_genai)
    counters = saturation.counters(loaded.recipe)
    assert counters and (loaded.recipe.config.symmetric or any(bool(c.offset.any()) for c in counters.values()))
    updates = _count_updates(loaded.program, counters)
    for count, counter in zip(updates.values(), counters.values(), strict=True):
        channels = counter.scale.numel()
        lowest = -127 if loaded.recipe.config.symmetric else -128
        codes = np.array([[0] * channels, [127] * channels, [lowest] * channels], np.int8)
        count(codes.reshape(1, 3, 1, channels).transpose(0, 2, 1, 3))  # [B, H, S, D] as present.* is
        assert (counter.hits, counter.values) == (2 * channels, 3 * channels)


@pytest.mark.parametrize(
    "flags, message",
    [(["--fa-quant"], "applies RoPE inside the op"), (["--kv-int8", "dynamic"], "no per-token int8 cache form")],
)
def test_genai_refuses_what_its_cache_cannot_hold(genai_float_dir, text_files, tmp_path, capsys, flags, message):
    capsys.readouterr()
    assert (
        main(
            [
                "compile",
                str(genai_float_dir),
                *flags,
                "--calib",
                str(text_files["calib"]),
                "-o",
                str(tmp_path / "o"),
                *SMALL,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not (tmp_path / "o").exists()


def test_the_large_model_paths(onnx_dirs, text_files, tmp_path, monkeypatch):
    """Models past protobuf's 2 GiB go to ONNX Runtime through a temporary file with external data and are
    written with model.onnx.data: the same paths, taken here by lowering the thresholds to 0 bytes."""
    from qpass.exporters import onnx_format
    from qpass.frontends.onnx import session as sessions

    monkeypatch.setattr(sessions, "IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(onnx_format, "EXTERNAL_BYTES", 0)
    out = tmp_path / "out"
    assert (
        main(
            [
                "compile",
                str(onnx_dirs[20]),
                "--kv-int8",
                "--calib",
                str(text_files["calib"]),
                "--eval",
                str(text_files["prose"]),
                "-o",
                str(out),
                *SMALL,
            ]
        )
        == 0
    )
    assert (out / "model.onnx.data").is_file()
    report = json.loads((out / "report.json").read_text())
    assert abs(report["eval"]["ppl_increase_pct"]) < 1 and report["eval"]["ppl_float"] == pytest.approx(
        report["eval"]["ppl_reference"]
    )
    assert not list(tmp_path.glob(".out.qpass-*"))
