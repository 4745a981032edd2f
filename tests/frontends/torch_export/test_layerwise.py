"""Layer-wise calibration (issue 13): the same recipe as the whole-model path, one layer's weights at a time,
hidden states spilled past a budget, nothing left behind, and clean refusals of what it does not do yet."""

import json
import os

import pytest
import torch

from qpass.cli import main
from qpass.core import memory
from qpass.core.calibrate import calibrate, calibrate_by_layer
from qpass.core.config import QuantConfig, RunSettings
from qpass.core.data import token_windows
from qpass.core.errors import QpassError
from qpass.core.evaluate import perplexity, window_nll
from qpass.core.recipe import Recipe, geometry
from qpass.frontends.torch_export import layerwise
from qpass.frontends.torch_export.frontend import TorchExportFrontend
from qpass.frontends.torch_export.layerwise import LayerwiseFrontend
from qpass.models.loaders import load_model
from qpass.models.tiny import byte_tokenizer, tiny_model

WINDOW, LAYERS = 32, 3
CONFIG = QuantConfig(fa_quant=True, kv_cache="static")
CALIB_SAMPLES, BATCH = 8, 3  # the layer-wise tests' run settings


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """``get(arch, dtype)``: a random 3-layer ``arch`` saved as sharded safetensors (with an index) in ``dtype``,
    with a byte-level tokenizer."""
    made, tokenizer = {}, byte_tokenizer()

    def get(arch: str, dtype: torch.dtype = torch.float32):
        if (arch, dtype) not in made:
            path = tmp_path_factory.mktemp(f"{arch}-{str(dtype)[6:]}")
            tiny_model(arch, num_layers=LAYERS).to(dtype).save_pretrained(path, max_shard_size="40KB")
            tokenizer.save_pretrained(path)
            assert (path / "model.safetensors.index.json").is_file()
            made[arch, dtype] = path
        return made[arch, dtype]

    return get


@pytest.fixture(scope="module")
def frontends(model_dir):
    """``get(arch, dtype)``: the whole-model frontend (float32, as the whole-model path computes) and the layer-wise
    one."""
    made = {}

    def get(arch: str, dtype: torch.dtype = torch.float32):
        if (arch, dtype) not in made:
            path = model_dir(arch, dtype)
            made[arch, dtype] = TorchExportFrontend.load(load_model(str(path)), WINDOW), LayerwiseFrontend(path, WINDOW)
        return made[arch, dtype]

    return get


@pytest.fixture(scope="module")
def windows(text_files):
    return token_windows(
        byte_tokenizer(), [text_files["prose"].read_text(encoding="utf-8")], WINDOW, CALIB_SAMPLES, "--calib"
    )


def _same(a: Recipe, b: Recipe) -> None:
    """Bit-identical recipes: the same sites, config and tensors."""
    assert a.sites == b.sites and a.config == b.config
    assert sorted(a.tensors) == sorted(b.tensors)
    assert [n for n in a.tensors if not torch.equal(a.tensors[n], b.tensors[n])] == []


@pytest.mark.parametrize(
    "arch, dtype, ppl",
    [("llama", torch.float32, True), ("qwen2", torch.float32, True), ("mistral", torch.bfloat16, False)],
)  # mistral: sliding window 8 < WINDOW
def test_recipe_and_perplexity_equal_the_whole_models(arch, dtype, ppl, frontends, windows):
    whole, lw = frontends(arch, dtype)
    expected, got = calibrate(whole, windows, CONFIG, BATCH), calibrate_by_layer(lw, windows, CONFIG, BATCH)
    _same(got, expected)
    assert list(got.stats) == list(expected.stats)  # per-site SQNR and saturation, layer by layer
    for key in ("sqnr_db", "saturation"):
        assert list(got.stats[key]) == list(expected.stats[key])
        for layer, table in expected.stats[key].items():
            assert got.stats[key][layer] == pytest.approx(table, rel=1e-4, abs=1e-6)
    assert [s.prefix for s in lw.attention_sites()] == [s.prefix for s in whole.attention_sites()]
    assert lw.num_parameters() == whole.num_parameters()
    if ppl:
        measured = [perplexity(whole.logits(r, verify=False), windows, BATCH) for r in (expected, got)]
        assert measured[1] == pytest.approx(measured[0], rel=1e-5)


def test_c8_alone_and_symmetric_equal_the_whole_models(frontends, windows):
    whole, lw = frontends("qwen2")
    config = QuantConfig(kv_cache="static", symmetric=True, observer="minmax")
    _same(
        calibrate(lw, windows, config, 2), calibrate(whole, windows, config, 2)
    )  # observe(): every layer, then the ranges


def test_max_context_widens_as_the_whole_models_does(frontends, windows):
    """``--max-context``: the layer-wise frontend reads the same RoPE frequencies (from its one-layer base model) and
    widens q and k's ranges alike."""
    whole, lw = frontends("llama")
    assert torch.equal(lw.rotary(), whole.rotary())
    config = QuantConfig(fa_quant=True, kv_cache="static", max_context=8 * WINDOW)
    _same(calibrate(lw, windows, config, 2), calibrate(whole, windows, config, 2))


@pytest.mark.parametrize("w8a8", [None, "static"])
def test_the_dynamic_caches_key_smoothing_equals_the_whole_models(w8a8, frontends, windows):
    """The dynamic cache's key smoothing layer by layer: the same search, the same scales, and (each layer's q and k
    projections folded as that layer runs) the same quantized perplexity."""
    whole, lw = frontends("qwen2")  # q and k with biases
    config = QuantConfig(kv_cache="dynamic", w8a8=w8a8)
    expected, got = calibrate(whole, windows, config, BATCH), calibrate_by_layer(lw, windows, config, BATCH)
    _same(got, expected)
    assert got.stats["key_smoothing"] == expected.stats["key_smoothing"]
    assert any(name.endswith(".key_smooth.scale") for name in got.tensors)  # the search smoothed somewhere
    nll = window_nll(whole.logits(expected, verify=False), windows, BATCH)
    plain = {k: v for k, v in expected.tensors.items() if not k.endswith(".key_smooth.scale")}
    unsmoothed = window_nll(whole.logits(expected.replace(tensors=plain), verify=False), windows, BATCH)
    assert (nll - unsmoothed).abs().max() > 1e-5  # the smoothing shows (2e-5 and 3e-4 here) ...
    torch.testing.assert_close(lw.window_nll(got, windows, BATCH), nll, rtol=0, atol=1e-7)  # ... layer by layer too


@pytest.mark.parametrize("arch, level", [("llama", "L0"), ("qwen2", "L3")])  # qwen2: q/k/v with biases
def test_w8a8_recipe_equals_the_whole_models(arch, level, frontends, windows):
    whole, lw = frontends(arch)
    config = QuantConfig(w8a8=True, kv_cache="static", disable_level=level)
    expected, got = calibrate(whole, windows, config), calibrate(lw, windows, config)
    _same(got, expected)
    assert len([k for k in got.tensors if k.startswith("w8a8.")]) == 2 * 7 * LAYERS - 2 * int(level[1:])
    assert dict(got.w8a8) == dict(expected.w8a8)  # the same Linears kept float, for the same reasons
    for name, ratio in expected.stats["w8a8"]["range_ratio"].items():
        assert got.stats["w8a8"]["range_ratio"][name] == pytest.approx(ratio, rel=1e-4)
    assert [layer.linears for layer in lw.layers()] == [
        tuple(s for s in lw.linear_sites() if f".{i}." in s.module) for i in range(LAYERS)
    ]


@pytest.mark.parametrize("arch, anti", [("llama", "m1"), ("llama", "m3"), ("qwen2", "m4")])  # qwen2: GQA v -> o, biases
def test_smoothed_w8a8_recipe_equals_the_whole_models(arch, anti, frontends, windows):
    """Smoothing layer by layer (each layer's float run, its scales folded in, then its calibration run) gives the
    whole-model path's smoothing scales, W8A8 ranges and Linear statistics, and the same quantized perplexity."""
    whole, lw = frontends(arch)
    config = QuantConfig(
        w8a8=True, fa_quant=True, kv_cache="static", anti_method=anti, act_method=3, disable_level="L2"
    )
    expected, got = calibrate(whole, windows, config), calibrate_by_layer(lw, windows, config)
    # bit for bit: the float and the smoothed model's hidden states pass on as the whole model's two runs see them, so
    # no offset at a rounding half (m3's r = 1 on max|X| puts one there) and no near-tie of a search can go another way
    _same(got, expected)
    assert len([k for k in got.tensors if k.startswith("smooth.")]) == len(expected.w8a8["smooth"]) >= 3 * LAYERS
    assert dict(got.w8a8) == dict(expected.w8a8)  # the same groups, in the same order, and the same float Linears
    assert got.stats["w8a8"] == expected.stats["w8a8"]  # what the method chose, group by group; SQNR, range ratios
    measured = [perplexity(whole.logits(r, verify=False), windows, 4) for r in (expected, got)]
    assert measured[1] == measured[0]


def test_smoothed_w8a8_holds_one_layers_statistics_at_a_time(frontends, windows, monkeypatch):
    """With smoothing, each layer is loaded once, in order, and when a layer loads no observer that has seen data is
    alive (the earlier layers' ranges are chosen; the smoothing groups' observers live only in the layer's float
    run)."""
    lw = frontends("llama")[1]
    made, alive, loads = _track_observers(monkeypatch)
    config = QuantConfig(w8a8=True, kv_cache="static", anti_method="m3")
    calibrate_by_layer(lw, windows, config)
    assert loads == list(range(LAYERS)) and alive == [0] * LAYERS


def _track_observers(monkeypatch) -> tuple[list, list, list]:
    """``(observers made (weak references), observers that had seen data alive at each layer load, layers loaded)``,
    filled as calibration runs."""
    import gc
    import weakref

    from qpass.core import observers as observers_module

    made, alive, loads = [], [], []
    original_init, original_load = observers_module.Observer.__init__, layerwise._LayerProgram.load

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        made.append(weakref.ref(self))

    def load(self, checkpoint, layer):
        gc.collect()
        alive.append(sum(1 for ref in made if ref() is not None and ref().min is not None))
        loads.append(layer)
        original_load(self, checkpoint, layer)

    monkeypatch.setattr(observers_module.Observer, "__init__", init)
    monkeypatch.setattr(layerwise._LayerProgram, "load", load)
    return made, alive, loads


def test_one_layer_of_weights_at_a_time(frontends, windows, monkeypatch):
    """Each layer's tensors are read once, in layer order, in one read after the previous layer's were released;
    the embedding first, the final norm and LM head never; one capture serves every layer."""
    lw = frontends("mistral", torch.bfloat16)[1]
    reads, loads = [], []
    original_read, original_load = layerwise.Checkpoint.read, layerwise._LayerProgram.load

    def read(self, names):
        reads.append(list(names))
        return original_read(self, names)

    def load(self, checkpoint, layer):
        loads.append(layer)
        assert all(p.is_meta for p in self.params.values()), "a layer was loaded while another's weights were held"
        original_load(self, checkpoint, layer)
        assert all(p.dtype == torch.float32 and not p.is_meta for p in self.params.values())

    monkeypatch.setattr(layerwise.Checkpoint, "read", read)
    monkeypatch.setattr(layerwise._LayerProgram, "load", load)
    calibrate_by_layer(lw, windows, CONFIG, BATCH)
    assert reads[0] == ["model.embed_tokens.weight"]
    per_layer = [{n.split(".")[2] for n in names} for names in reads[1:]]
    assert per_layer == [{str(i)} for i in range(LAYERS)] and loads == list(range(LAYERS))
    stored = set(lw.checkpoint.files)
    assert sorted(n for names in reads for n in names) == sorted(
        n for n in stored if n.startswith("model.layers.") or "embed" in n
    )
    assert len({lw.checkpoint.files[n] for n in stored}) > 3  # sharded: the layers' tensors came from several files
    assert not any("lm_head" in n or n == "model.norm.weight" for names in reads for n in names)
    assert len(lw._programs) == 1  # one capture (one layer type), its weights swapped per layer
    assert all(p.is_meta for p in lw._programs["all"].params.values())  # the last layer released too
    # in the file's dtype: the bf16 checkpoint is read as bf16 and widened one layer at a time
    assert (
        original_read(lw.checkpoint, ["model.layers.0.mlp.up_proj.weight"])["model.layers.0.mlp.up_proj.weight"].dtype
        == torch.bfloat16
    )


def test_each_layers_statistics_are_dropped_when_it_is_done(frontends, windows, monkeypatch):
    """calibrate_by_layer holds the observers of one layer at a time: when a layer's weights are loaded, no
    observer that has seen data is alive but that layer's (the earlier layers' ranges are already chosen)."""
    lw = frontends("llama")[1]
    made, alive, _ = _track_observers(monkeypatch)
    recipe = calibrate_by_layer(lw, windows, CONFIG, BATCH)
    assert len(made) == 3 * LAYERS and alive == [0] * LAYERS  # q, k, v per layer; none left over when the next loads
    assert sorted({int(k.split(".")[1]) for k in recipe.tensors}) == list(range(LAYERS))


def test_hidden_states_spill_to_temporary_files_removed_after(frontends, windows, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    lw = frontends("mistral", torch.bfloat16)[1]
    expected = calibrate_by_layer(lw, windows, CONFIG, BATCH)
    assert lw.spilled is None
    seen = []
    original = layerwise._LayerProgram.load

    def load(self, checkpoint, layer):  # the spill directory exists while the layers run
        seen.append(os.path.isdir(lw.spilled))
        original(self, checkpoint, layer)

    monkeypatch.setattr(layerwise._LayerProgram, "load", load)
    monkeypatch.setattr(lw, "hidden_budget", 1024)
    got = calibrate_by_layer(lw, windows, CONFIG, BATCH)
    assert lw.spilled is not None and lw.spilled.startswith(str(tmp_path)) and seen == [True] * LAYERS
    assert not os.path.exists(lw.spilled) and list(tmp_path.iterdir()) == []
    assert sorted(got.tensors) == sorted(expected.tensors)
    assert all(torch.equal(got.tensors[k], expected.tensors[k]) for k in got.tensors)  # the same numbers, bit for bit


def test_an_interrupted_run_leaves_no_spill_file(frontends, windows, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    lw = frontends("llama")[1]
    monkeypatch.setattr(lw, "hidden_budget", 1024)

    def interrupt(self, checkpoint, layer):
        assert os.path.isdir(lw.spilled)
        raise KeyboardInterrupt

    monkeypatch.setattr(layerwise._LayerProgram, "load", interrupt)
    with pytest.raises(KeyboardInterrupt):
        calibrate_by_layer(lw, windows, CONFIG, BATCH)
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_the_recipe_a_whole_model_compile_reuses(model_dir, frontends, text_files, tmp_path, capsys):
    path, out = model_dir("llama"), tmp_path / "out"
    calib = text_files["calib"]
    args = [
        "compile",
        str(path),
        "--kv-int8",
        "--fa-quant",
        "--window",
        str(WINDOW),
        "--calib-samples",
        "4",
        "--calib",
        str(calib),
    ]
    assert main([*args, "--layerwise", "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["recipe", "report.json", "report.png", "report.txt", "tokenizer"]
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["layerwise"] is True and report["calibration"]["layerwise"] is True
    recipe = Recipe.load(out / "recipe")
    whole = frontends("llama")[0]
    recipe.check_matches(geometry(whole.attention_sites()))
    capsys.readouterr()
    assert main(["eval", str(out), "--eval", str(calib)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "recipe only" in err and "--recipe" in err


def test_a_recipe_is_reused_layer_by_layer_with_the_same_figures(model_dir, text_files, tmp_path):
    """--recipe with --layerwise takes the same road: nothing calibrated, the quantized model measured layer by layer
    with the first compile's numbers."""
    path, first, again = model_dir("llama"), tmp_path / "first", tmp_path / "again"
    common = [
        str(path),
        "--layerwise",
        "--window",
        str(WINDOW),
        "--eval",
        str(text_files["prose"]),
        "--eval-windows",
        "2",
    ]
    assert (
        main(
            [
                "compile",
                *common,
                "--kv-int8",
                "--calib-samples",
                "4",
                "--calib",
                str(text_files["calib"]),
                "-o",
                str(first),
            ]
        )
        == 0
    )
    assert main(["compile", *common, "--recipe", str(first / "recipe"), "-o", str(again)]) == 0
    one, two = (json.loads((d / "report.json").read_text()) for d in (first, again))
    assert "calibrate" not in two["timings_s"] and two["calibration"]["layerwise"] is True
    assert (
        two["eval"]["ppl_quant"] == one["eval"]["ppl_quant"]
        and two["saturation"]["measured"] == one["saturation"]["measured"]
    )


def test_the_dynamic_cache_compiles_layerwise_as_a_recipe_with_only_its_key_smoothing(model_dir, tmp_path):
    """The one road: a dynamic cache calibrates no range, layer by layer as whole, only its key smoothing, and the
    recipe says so."""
    out = tmp_path / "o"
    assert (
        main(
            [
                "compile",
                str(model_dir("llama")),
                "--kv-int8",
                "dynamic",
                "--layerwise",
                "--window",
                str(WINDOW),
                "--calib-samples",
                "2",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    recipe = Recipe.load(out / "recipe")
    assert recipe.config.kv_cache == "dynamic" and len(recipe.sites) == LAYERS
    assert all(name.endswith(".key_smooth.scale") for name in recipe.tensors)
    assert sorted(recipe.stats["key_smoothing"]) == [str(i) for i in range(LAYERS)]


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--eval", "MISSING"], "--eval"),
    ],
)
def test_what_layerwise_does_not_do_is_refused_in_one_line(extra, words, model_dir, text_files, tmp_path, capsys):
    evaluation = text_files["prose"]
    extra = [str(evaluation) if e == "EVAL" else str(tmp_path / "missing.txt") if e == "MISSING" else e for e in extra]
    quantize = [] if "--kv-int8" in extra else ["--kv-int8"]
    model = model_dir("llama")
    capsys.readouterr()  # the fixture's own output, when it made the model here
    assert main(["compile", str(model), *quantize, *extra, "--layerwise", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_an_architecture_it_cannot_stream_is_refused(tmp_path):
    tiny_model("gpt2", num_layers=1).save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(QpassError, match="model_type 'gpt2' is not one layer-wise calibration supports"):
        LayerwiseFrontend(tmp_path, WINDOW)


def test_layerwise_is_automatic_when_the_model_would_not_fit(model_dir, tmp_path, monkeypatch, capsys):
    import qpass.api

    monkeypatch.setattr(memory, "available_memory", lambda: 1 << 20)
    result = qpass.api.compile(
        str(model_dir("llama")),
        QuantConfig(kv_cache="static"),
        calib=["a few words of calibration text, repeated. " * 40],
        run=RunSettings(window=WINDOW, calib_samples=2),
    )
    note = [line for line in capsys.readouterr().err.splitlines() if "one decoder layer at a time" in line]
    assert len(note) == 1 and "GiB" in note[0]
    assert result.program is None and result.report["model"]["layerwise"] is True


def test_a_model_too_big_is_written_as_a_mindie_directory_layer_by_layer(
    model_dir, text_files, tmp_path, monkeypatch, capsys
):
    """Too big for a whole-model compile, with --format mindie: calibrated layer-wise (the note) and written as
    shards."""
    from qpass.exporters.mindie_format import WEIGHTS_FILE, WEIGHTS_INDEX, shard_name

    monkeypatch.setattr(memory, "available_memory", lambda: 1 << 20)
    args = [
        "compile",
        str(model_dir("llama")),
        "--kv-int8",
        "--w8a8",
        "--window",
        str(WINDOW),
        "--calib-samples",
        "4",
        "--calib",
        str(text_files["calib"]),
        "--format",
        "mindie",
        "-o",
        str(tmp_path / "o"),
    ]
    assert main(args) == 0
    assert "calibrating one decoder layer at a time" in capsys.readouterr().err
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert WEIGHTS_INDEX in names and WEIGHTS_FILE not in names
    assert [n for n in names if n.endswith(".safetensors")] == [shard_name(i, LAYERS + 1) for i in range(1, LAYERS + 2)]


@pytest.mark.parametrize(
    "damage, words",
    [("shard", "not a file in the directory"), ("tensor", "which has no such tensor"), ("map", "no weight_map")],
)
def test_a_damaged_sharded_directory_is_refused_naming_what(damage, words, model_dir, text_files, tmp_path):
    import qpass.api
    from qpass.exporters.mindie_format import WEIGHTS_INDEX
    from qpass.exporters.mindie_load import load as load_mindie

    config = QuantConfig(w8a8=True)
    qpass.api.compile(
        str(model_dir("llama")),
        config,
        calib=[text_files["calib"].read_text(encoding="utf-8")],
        run=RunSettings(window=WINDOW, calib_samples=2),
        layerwise=True,
    ).save(tmp_path / "d", format="mindie")
    index_path = tmp_path / "d" / WEIGHTS_INDEX
    index = json.loads(index_path.read_text())
    if damage == "shard":
        (tmp_path / "d" / index["weight_map"]["model.norm.weight"]).unlink()
    elif damage == "tensor":
        index["weight_map"]["model.layers.0.mlp.gate_proj.weight"] = index["weight_map"]["model.norm.weight"]
    else:
        index = {"metadata": {}}
    if damage != "shard":
        index_path.write_text(json.dumps(index))
    with pytest.raises(QpassError, match=words):
        load_mindie(tmp_path / "d")


def test_the_read_back_check_keeps_one_linears_tensors_at_a_time(model_dir, text_files, tmp_path, monkeypatch):
    """The check before a directory is moved into place reads every tensor and keeps none (a layer-wise writer's
    directory may be larger than memory): at any read, at most one Linear's tensors are alive, where loading the
    model keeps every W8A8 weight. It refuses what loading refuses (a NaN scale in one shard)."""
    import weakref

    from safetensors.torch import load_file, save_file

    import qpass.api
    from qpass.exporters import mindie_load
    from qpass.exporters.mindie_format import WEIGHTS_INDEX

    config = QuantConfig(w8a8=True, kv_cache="static")
    qpass.api.compile(
        str(model_dir("llama")),
        config,
        calib=[text_files["calib"].read_text(encoding="utf-8")],
        run=RunSettings(window=WINDOW, calib_samples=2),
        layerwise=True,
    ).save(tmp_path / "d", format="mindie")
    alive, peak, reads = [], [0], [0]
    original = mindie_load._Tensors.__getitem__

    def get(self, name):
        tensor = original(self, name)
        alive[:] = [ref for ref in alive if ref() is not None] + [weakref.ref(tensor)]
        peak[0], reads[0] = max(peak[0], len(alive)), reads[0] + 1
        return tensor

    monkeypatch.setattr(mindie_load._Tensors, "__getitem__", get)
    mindie_load.check(tmp_path / "d")
    weight_map = json.loads((tmp_path / "d" / WEIGHTS_INDEX).read_text())["weight_map"]
    assert reads[0] >= len(weight_map) and peak[0] <= 8
    alive.clear()
    kept = mindie_load.load(tmp_path / "d")
    assert kept.model is not None and len(alive) >= 7 * LAYERS  # the measure can fail: the built model holds them
    monkeypatch.undo()
    name = "model.layers.1.self_attn.k_proj.kv_cache_scale"
    shard = tmp_path / "d" / weight_map[name]
    tensors = load_file(str(shard))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(QpassError, match="kv_cache_scale .*not a positive finite number"):
        mindie_load.check(tmp_path / "d")


@pytest.mark.parametrize(
    "target, extra",
    [
        ("mindie", dict(fa_quant=True, anti_method="m1")),
        ("vllm-ascend", dict(symmetric=True, anti_method="m3", disable_level="L2")),
    ],
)
def test_a_layerwise_mindie_directory_holds_the_whole_models_tensors(
    target, extra, model_dir, text_files, tmp_path, monkeypatch
):
    """The same recipe written by the whole-model path (one file) and layer by layer (a shard per layer, then the
    rest, with the index): the same tensors bit for bit, the same description and config; the reader loads both to
    the same perplexity. The layer-wise writer reads one tensor at a time, layer after layer."""
    from safetensors.torch import load_file

    import qpass.api
    from qpass.exporters.mindie_format import CONFIG_FILE, DESCRIPTION_FILE, WEIGHTS_FILE, WEIGHTS_INDEX
    from qpass.exporters.mindie_load import load as load_mindie

    path = model_dir("llama")
    config, run = QuantConfig(w8a8=True, kv_cache="static", **extra), RunSettings(window=WINDOW, calib_samples=4)
    calib = [text_files["calib"].read_text(encoding="utf-8")]
    by_layer = qpass.api.compile(str(path), config, calib=calib, run=run, layerwise=True)
    whole = qpass.api.compile(
        str(path), config, recipe=by_layer.recipe, run=RunSettings(window=WINDOW), layerwise=False
    )
    reads = []
    original_read = layerwise.Checkpoint.read

    def read(self, names):
        reads.append(list(names))
        return original_read(self, names)

    monkeypatch.setattr(layerwise.Checkpoint, "read", read)
    by_layer.save(tmp_path / "layerwise", format=target)
    monkeypatch.undo()
    whole.save(tmp_path / "whole", format=target)
    assert all(len(names) == 1 for names in reads)
    layers = [int(n.split(".")[2]) if n.startswith("model.layers.") else LAYERS for names in reads for n in names]
    assert layers == sorted(layers) and set(layers) == set(range(LAYERS + 1))  # layer after layer, the rest last
    index = json.loads((tmp_path / "layerwise" / WEIGHTS_INDEX).read_text())
    sharded = {}
    for shard in sorted(set(index["weight_map"].values())):
        sharded.update(load_file(str(tmp_path / "layerwise" / shard)))
    expected = load_file(str(tmp_path / "whole" / WEIGHTS_FILE))
    assert sorted(sharded) == sorted(expected) == sorted(index["weight_map"])
    for name, tensor in expected.items():
        assert sharded[name].dtype == tensor.dtype and torch.equal(sharded[name], tensor), name
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    for name in (DESCRIPTION_FILE, CONFIG_FILE):
        assert json.loads((tmp_path / "layerwise" / name).read_text()) == json.loads(
            (tmp_path / "whole" / name).read_text()
        )
    windows = token_windows(byte_tokenizer(), calib, WINDOW, 4, "--eval")
    ppl = [
        perplexity(lambda ids, m=load_mindie(tmp_path / d).model: m(ids).logits, windows, 4)
        for d in ("layerwise", "whole")
    ]
    assert ppl[0] == ppl[1]
    if (
        target == "vllm-ascend"
    ):  # vLLM reads every *.safetensors of the directory (its index filter names model.safetensors.index.json)
        from tests.helpers.vllm_ascend_loader import load as vllm_ascend_load

        params, expected_params = vllm_ascend_load(tmp_path / "layerwise"), vllm_ascend_load(tmp_path / "whole")
        assert sorted(params) == sorted(expected_params) and all(
            torch.equal(params[k], expected_params[k]) for k in params
        )


@pytest.mark.parametrize(
    "index",
    ['{"weight_map": ["a"]}', '{"weight_map": {"x": 3}}', "[1]", '{"weight_map": {"x": "gone.safetensors"}}', "{"],
)
def test_the_memory_estimate_leaves_a_broken_directory_to_the_loader(index, model_dir, tmp_path):
    """The automatic switch reads every shard's header; a broken index gives no estimate (the whole-model loader
    then says what is wrong) instead of a traceback."""
    import shutil

    path = shutil.copytree(model_dir("llama"), tmp_path / "m")
    (path / "model.safetensors.index.json").write_text(index)
    assert layerwise.whole_model_memory(path) is None
    assert layerwise.whole_model_memory(model_dir("llama")) > 0


def test_the_streamed_forward_frees_each_quantized_layer_before_the_next(frontends, windows, monkeypatch):
    """The quantized one-layer program holds reference cycles (fx graphs): unless it is collected, every layer's
    quantized weights pile up (a 30 GB model's streamed forward grew by about 0.5 GB a layer)."""
    import weakref

    whole, lw = frontends("llama")
    config = QuantConfig(w8a8=True, kv_cache="static")
    recipe = calibrate(whole, windows, config)
    made, alive_at_load = [], []
    original_quantized, original_load = layerwise._LayerProgram.quantized, layerwise._LayerProgram.load

    def quantized(self, *args, **kwargs):
        module = original_quantized(self, *args, **kwargs)
        made.append(weakref.ref(module))
        return module

    def load(self, *args, **kwargs):
        alive_at_load.append(sum(ref() is not None for ref in made))
        return original_load(self, *args, **kwargs)

    monkeypatch.setattr(layerwise._LayerProgram, "quantized", quantized)
    monkeypatch.setattr(layerwise._LayerProgram, "load", load)
    lw.window_nll(recipe, windows[:4], 4)
    assert len(made) == LAYERS and alive_at_load == [0] * LAYERS


@pytest.mark.parametrize(
    "arch, extra",
    [
        ("llama", {"fa_quant": True, "kv_cache": "static"}),
        (
            "llama",
            {
                "w8a8": True,
                "fa_quant": True,
                "kv_cache": "static",
                "anti_method": "m3",
                "act_method": 3,
                "disable_level": "L2",
            },
        ),
        ("qwen2", {"w8a8": True, "kv_cache": "static", "anti_method": "m3", "act_method": 3, "disable_level": "L2"}),
    ],
)
def test_the_streamed_forward_gives_the_whole_models_nll(arch, extra, frontends, windows):
    """Layer by layer over every window, float and quantized (smoothing, Q/DQ, W8A8 and float Linears from the recipe),
    the per-window NLL is the whole-model program's; saturation is counted site by site as the whole model counts it."""
    from qpass.core import saturation

    whole, lw = frontends(arch)
    config = QuantConfig(**extra)
    recipe = calibrate(whole, windows, config, 3)
    torch.testing.assert_close(
        lw.window_nll(None, windows, 3), window_nll(whole.logits(), windows, 3), rtol=1e-5, atol=1e-6
    )
    expected, got = saturation.counters(recipe), saturation.counters(recipe)
    quantized, _ = whole.apply(recipe, verify=False)
    nll = window_nll(whole.counting_logits(quantized, expected), windows, 3)
    torch.testing.assert_close(lw.window_nll(recipe, windows, 3, counters=got), nll, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(nll, window_nll(whole.logits(), windows, 3))  # quantization shows
    assert {k: (c.hits, c.values) for k, c in got.items()} == {k: (c.hits, c.values) for k, c in expected.items()}
    assert len(got) == LAYERS * (3 if config.fa_quant else 2)


def test_layerwise_eval_and_saturation_equal_the_whole_models(model_dir, text_files, tmp_path):
    """``--layerwise --eval``: the float and quantized perplexity, measured layer by layer, are the whole-model
    compile's, and so is the saturation on the evaluation text; without ``--eval``, saturation is measured on
    held-out windows."""
    path, calib, prose = model_dir("llama"), text_files["calib"], text_files["prose"]
    args = [
        "compile",
        str(path),
        "--kv-int8",
        "--fa-quant",
        "--window",
        str(WINDOW),
        "--calib-samples",
        "6",
        "--calib",
        str(calib),
        "--eval",
        str(prose),
        "--eval-windows",
        "5",
    ]
    assert main([*args, "-o", str(tmp_path / "whole")]) == 0
    assert main([*args, "--layerwise", "-o", str(tmp_path / "lw")]) == 0
    whole, lw = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("whole", "lw"))
    assert lw["eval"]["layerwise"] is True and lw["eval"]["windows"] == whole["eval"]["windows"] == 5
    for key in ("ppl_float", "ppl_quant"):
        assert lw["eval"][key] == pytest.approx(whole["eval"][key], rel=1e-5)
    assert lw["saturation"]["measured_on"] == "eval" and lw["saturation"]["measured"] == whole["saturation"]["measured"]
    assert "float layer by layer" in (tmp_path / "lw" / "report.txt").read_text()
    held = args[:-4] + ["--layerwise", "-o", str(tmp_path / "held")]
    assert main(held) == 0
    report = json.loads((tmp_path / "held" / "report.json").read_text())
    assert report["saturation"]["measured_on"] == "held_out" and report["calibration"]["held_out_windows"] == 1
    assert set(report["saturation"]["measured"]) == {str(i) for i in range(LAYERS)}


def test_layerwise_auto_searches_as_the_whole_model_does(frontends, windows, monkeypatch):
    """``--disable-level auto`` layer-wise: the SQNR ranking (no backward pass layer by layer), trials measured by the
    streamed forward on the held-out windows; the whole model, given the same ranking, keeps the same Linears float."""
    whole, lw = frontends("llama")
    monkeypatch.setattr(TorchExportFrontend, "loss_sensitivity", lambda *args: None)
    config = QuantConfig(w8a8=True, kv_cache="static", act_method=3, disable_level="auto", max_ppl_increase=5e-5)
    # divergence from the float model (this random model predicts nearly uniformly): all-int8 +0.00010%, all Linears
    # float (C8 alone) +0.00002%: the search runs beyond the 10% share
    expected, got = calibrate(whole, windows, config), calibrate_by_layer(lw, windows, config)
    search = got.stats["w8a8"]["search"]
    assert search[0]["held_out_windows"] == 2 and {step["ranking"] for step in search[1:]} <= {"none", "sqnr"}
    assert len(search) > 4  # a binary search ran: all-int8 was not within the limit
    assert dict(got.w8a8) == dict(expected.w8a8)
    assert any(step["dynamic_linears"] for step in search[1:])  # and its per-token step, streamed layer by layer
    for ours, theirs in zip(search[1:], expected.stats["w8a8"]["search"][1:], strict=True):
        assert (ours["float_linears"], ours["dynamic_linears"]) == (theirs["float_linears"], theirs["dynamic_linears"])
        assert ours["ppl_increase_pct"] == pytest.approx(theirs["ppl_increase_pct"], abs=1e-3)
