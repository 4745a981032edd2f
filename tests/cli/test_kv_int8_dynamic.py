"""``--kv-int8 dynamic`` from the command line: the option's forms, the refusals (with --fa-quant, by the MindIE
formats), calibration that observes only q and k (the key smoothing), and the qpass directory's round trip (compile,
eval, run)."""

import json

import pytest
import torch

from qpass.cli import build_parser, main
from qpass.core.calibrate import calibrate
from qpass.core.config import QuantConfig
from qpass.core.errors import QpassError
from qpass.core.recipe import Recipe
from qpass.exporters import registry
from qpass.models.tiny import tiny_model
from tests.helpers.frontend_cases import frontend
from tests.helpers.paged_cases import tiny

SMALL = ["--window", "64", "--calib-samples", "4", "--eval-windows", "4", "--batch-size", "2"]


@pytest.mark.parametrize(
    "argv, kv_cache",
    [
        ([], None),
        (["--kv-int8"], "static"),
        (["--kv-int8", "static"], "static"),
        (["--kv-int8", "dynamic"], "dynamic"),
        (["--kv-int8", "--w8a8"], "static"),
    ],
)
def test_kv_int8_takes_an_optional_form(argv, kv_cache):
    assert build_parser().parse_args(["compile", "MODEL", *argv, "-o", "out"]).kv_cache == kv_cache


def test_an_unknown_form_is_a_usage_error_that_says_what_went_wrong(capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["compile", "--kv-int8", "default", "-o", "out"])  # MODEL taken for the form
    assert exited.value.code == 2
    assert (
        "'default' is not static or dynamic (a bare --kv-int8 is static; give MODEL before --kv-int8)"
        in capsys.readouterr().err
    )


def test_config_takes_dynamic_observes_nothing_for_it_and_refuses_it_with_faquant():
    assert QuantConfig(kv_cache="dynamic").observed_kinds == ()
    assert QuantConfig(kv_cache="dynamic", w8a8=True).observed_kinds == ()
    with pytest.raises(ValueError, match="FAQuant fixes the cache to static int8"):
        QuantConfig(fa_quant=True, kv_cache="dynamic")


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_fa_quant_with_dynamic_is_one_line_exit_2(tmp_path, capsys):
    assert (
        main(["compile", str(tmp_path / "model"), "--fa-quant", "--kv-int8", "dynamic", "-o", str(tmp_path / "o")]) == 2
    )
    err = _one_line_error(capsys)
    assert "--fa-quant --kv-int8 dynamic" in err and "use --fa-quant --kv-int8 (static), or drop --fa-quant" in err


@pytest.mark.parametrize("fmt", ["mindie", "vllm-ascend"])
def test_mindie_formats_refuse_dynamic_before_the_slow_part(tmp_path, capsys, fmt):
    assert (
        main(
            [
                "compile",
                str(tmp_path / "model"),
                "--w8a8",
                "--kv-int8",
                "dynamic",
                "--format",
                fmt,
                "-o",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = _one_line_error(capsys)
    assert (
        f"--format {fmt} with --kv-int8 dynamic" in err
        and "compile with --kv-int8 (static), or write --format qpass" in err
    )


def test_calibration_observes_only_q_and_k_for_the_dynamic_caches_key_smoothing():
    """The dynamic cache calibrates no range; its key smoothing (tests/core/test_key_smoothing.py) observes q and k,
    in one run, beside W8A8's Linear inputs when there are any."""
    fe = frontend(tiny_model("llama"), 16)
    observed, observe = [], fe.observe
    fe.observe = lambda windows, observers, *a, **k: (
        observed.append(set(observers)),
        observe(windows, observers, *a, **k),
    )
    ids = torch.randint(0, 256, (8, 16))
    sites = fe.attention_sites()
    recipe = calibrate(fe, ids, QuantConfig(kv_cache="dynamic"))
    assert observed == [{getattr(s, kind) for s in sites for kind in ("q", "k")}]
    assert all(name.endswith(".key_smooth.scale") for name in recipe.tensors)
    assert sorted(recipe.stats["key_smoothing"]) == [str(s.layer) for s in sites]
    observed.clear()
    recipe = calibrate(fe, ids, QuantConfig(kv_cache="dynamic", w8a8=True))
    attention = {getattr(s, kind) for s in sites for kind in ("q", "k", "v")}
    assert [names & attention for names in observed if names & attention] == [
        {getattr(s, kind) for s in sites for kind in ("q", "k")}
    ]
    assert recipe.w8a8_linears() and all(
        n.startswith("w8a8.") or n.endswith(".key_smooth.scale") for n in recipe.tensors
    )


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, smollm2_tokenizer, text_files):
    """``qpass compile DIR --kv-int8 dynamic`` of a tiny Llama (head_dim 64, so the decoder is lowered)."""
    torch.manual_seed(0)
    model_dir = tmp_path_factory.mktemp("tiny-llama-64")
    tiny("llama", vocab_size=len(smollm2_tokenizer)).save_pretrained(model_dir, safe_serialization=True)
    smollm2_tokenizer.save_pretrained(model_dir)
    out = tmp_path_factory.mktemp("dynamic") / "out"
    assert (
        main(
            [
                "compile",
                str(model_dir),
                "--kv-int8",
                "dynamic",
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
    return model_dir, out


def test_the_directory_records_the_dynamic_cache(compiled):
    _, out = compiled
    recipe = Recipe.load(out / "recipe")
    assert recipe.config == QuantConfig(kv_cache="dynamic")  # JSON round trip
    assert all(name.endswith(".key_smooth.scale") for name in recipe.tensors)
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["key_smoothing"]) == ["0", "1"]
    assert "  key smoothing: K's channels evened out at " in (out / "report.txt").read_text()
    assert report["passes"] == {"InsertKVCacheQDQPass": 4}
    assert "quantized: int8 KV cache dynamic (per token and kv head)" in (out / "report.txt").read_text()
    assert report["decoder"]["file"] == "decoder.pt2" and report["decoder"]["kv_cache"] == "dynamic"
    assert 0 < abs(report["eval"]["ppl_increase_pct"]) < 5


def test_eval_and_run_reload_it(compiled, text_files, smollm2_tokenizer, capsys):
    from qpass.frontends.torch_export.decoder import build_decoder, generate_reference
    from qpass.models.loaders import load_model

    model_dir, out = compiled
    capsys.readouterr()
    assert main(["eval", str(out), "--eval", str(text_files["prose"]), "--eval-windows", "4", "--json"]) == 0
    ppl = json.loads(capsys.readouterr().out)["ppl_quant"]
    assert ppl == json.loads((out / "report.json").read_text())["eval"]["ppl_quant"]
    assert main(["run", str(out), "--prompt", "Once upon a time", "--max-new-tokens", "6"]) == 0
    prompt = smollm2_tokenizer("Once upon a time")["input_ids"]
    reference, _ = build_decoder(load_model(str(model_dir)).model, Recipe.load(out / "recipe"), max_context=64)
    new = generate_reference(
        reference, prompt, 6, eos_token_id=smollm2_tokenizer.eos_token_id
    )  # the fake-quant program's
    assert capsys.readouterr().out.strip() == smollm2_tokenizer.decode(prompt + new, skip_special_tokens=True).strip()


@pytest.mark.parametrize("fmt", ["mindie", "vllm-ascend"])
def test_mindie_exporters_refuse_a_dynamic_recipe(compiled, tmp_path, capsys, fmt):
    model_dir, out = compiled
    with pytest.raises(QpassError, match=f"--format {fmt} with --kv-int8 dynamic: .*or write --format qpass"):
        registry.get(fmt).write(registry.Compiled(Recipe.load(out / "recipe"), {}), tmp_path, {})
    assert (
        main(["compile", str(model_dir), "--recipe", str(out / "recipe"), "--format", fmt, "-o", str(tmp_path / "o")])
        == 2
    )
    assert f"--format {fmt} with --kv-int8 dynamic" in _one_line_error(capsys)
