"""The qpass command end to end on a tiny model directory (its answers to bad input: test_bad_inputs.py)."""

import json
import subprocess
import sys

import pytest

from qpass.cli import main

SMALL = ["--window", "64", "--calib-samples", "4", "--eval-windows", "4", "--batch-size", "2"]
REUSE_SMALL = ["--window", "64", "--eval-windows", "4", "--batch-size", "2"]  # --recipe reads no calibration windows


@pytest.fixture(scope="module")
def compiled(tiny_model_dir, text_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled") / "out"
    code = main(
        [
            "compile",
            str(tiny_model_dir),
            "--fa-quant",
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
    assert code == 0
    return out


def test_compile_writes_program_recipe_and_report(compiled):
    for name in (
        "program.pt2",
        "recipe/recipe.json",
        "recipe/recipe.safetensors",
        "report.json",
        "report.txt",
        "report.png",
        "tokenizer/tokenizer.json",
    ):
        assert (compiled / name).is_file(), name
    assert (compiled / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((compiled / "report.json").read_text())
    ev = report["eval"]
    assert ev["tokens"] == 4 * 64
    assert abs(ev["ppl_float"] / ev["ppl_reference"] - 1) < 1e-4  # capture reproduces the model
    assert ev["ppl_increase_pct"] == pytest.approx((ev["ppl_quant"] / ev["ppl_float"] - 1) * 100)
    assert {"load", "capture", "calibrate", "passes", "eval"} <= set(report["timings_s"])
    assert report["passes"] == {"InsertFAQuantQDQPass": 6, "InsertKVCacheQDQPass": 4}
    assert set(report["sqnr_db"]["1"]) == {"q", "k", "v"}
    assert [s["num_kv_heads"] for s in report["sites"]] == [2, 2]
    sat = report["saturation"]  # per site and kind, on the eval text and on the calibration text
    assert sat["measured_on"] == "eval" and sat["tokens"] == 4 * 64
    for table in (sat["measured"], sat["calibration"]):
        assert set(table) == {"0", "1"} and all(set(kinds) == {"q", "k", "v"} for kinds in table.values())
        assert all(0.0 <= f <= 1.0 for kinds in table.values() for f in kinds.values())
    assert "saturation (values at the int8 limits), eval vs calibration:" in (compiled / "report.txt").read_text()
    assert report["warnings"][0].startswith("calibration text: only 256 tokens")  # SMALL calibrates on 4 windows of 64


def test_eval_reloads_and_reproduces_the_quantized_perplexity(compiled, text_files, capsys):
    capsys.readouterr()
    assert main(["eval", str(compiled), "--eval", str(text_files["prose"]), "--eval-windows", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    report = json.loads((compiled / "report.json").read_text())
    assert result["ppl_quant"] == report["eval"]["ppl_quant"]
    # the same windows through the same program: the same saturation, against the recipe's calibration figures
    assert result["saturation"]["measured"] == report["saturation"]["measured"]
    assert result["saturation"]["calibration"] == report["saturation"]["calibration"]


def test_eval_prints_a_summary_with_the_float_model_beside_the_quantized(compiled, tiny_model_dir, text_files, capsys):
    """The float model is the one the report names (the directory it was compiled from): its perplexity on the same
    windows is the compile's reference, and the summary gives both, the increase and the worst saturation."""
    capsys.readouterr()
    assert main(["eval", str(compiled), "--eval", str(text_files["prose"]), "--eval-windows", "4"]) == 0
    out = capsys.readouterr().out
    report = json.loads((compiled / "report.json").read_text())
    ev = report["eval"]
    increase = (ev["ppl_quant"] / ev["ppl_reference"] - 1) * 100
    assert f"perplexity: float {ev['ppl_reference']:.4f}, quantized {ev['ppl_quant']:.4f} ({increase:+.3f}%)" in out
    worst = max(v for kinds in report["saturation"]["measured"].values() for v in kinds.values())
    assert "saturation: worst layer" in out and f"{worst:.3%}" in out
    assert len(out.splitlines()) <= 6 and "--json" in out
    assert (
        main(["eval", str(compiled), "--eval", str(text_files["prose"]), "--eval-windows", "4", "--no-float", "--json"])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["float"] == {"skipped": "not asked for"} and "ppl_increase_pct" not in result


def test_recipe_reuse_gives_the_same_program(compiled, tiny_model_dir, text_files, tmp_path):
    out = tmp_path / "again"
    assert (
        main(
            [
                "compile",
                str(tiny_model_dir),
                "--recipe",
                str(compiled / "recipe"),
                "--eval",
                str(text_files["prose"]),
                "-o",
                str(out),
                *REUSE_SMALL,
            ]
        )
        == 0
    )  # the run settings are this run's: the same window
    first, again = (json.loads((d / "report.json").read_text()) for d in (compiled, out))
    assert again["eval"]["ppl_quant"] == first["eval"]["ppl_quant"]
    assert "calibrate" not in again["timings_s"]
    assert again["run"] == {k: v for k, v in first["run"].items() if k != "calib_samples"}  # no calibration windows
    assert (out / "recipe/recipe.safetensors").read_bytes() == (compiled / "recipe/recipe.safetensors").read_bytes()


def test_recipe_reuse_keeps_this_runs_settings_and_refuses_another_policy(
    compiled, tiny_model_dir, text_files, tmp_path, capsys
):
    """Window, batch size and evaluation windows are run settings: with --recipe they are this run's (the program is
    captured over the new window); a policy flag that says otherwise than the recipe is refused, not dropped, and so
    is --calib-samples, which nothing would read."""
    out = tmp_path / "wider"
    assert (
        main(
            [
                "compile",
                str(tiny_model_dir),
                "--recipe",
                str(compiled / "recipe"),
                "--eval",
                str(text_files["prose"]),
                "-o",
                str(out),
                "--window",
                "32",
                "--eval-windows",
                "2",
                "--batch-size",
                "1",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["window"] == 32 and report["eval"]["window"] == 32 and report["eval"]["tokens"] == 2 * 32
    capsys.readouterr()
    assert (
        main(
            [
                "compile",
                str(tiny_model_dir),
                "--recipe",
                str(compiled / "recipe"),
                "--observer",
                "minmax",
                "-o",
                str(tmp_path / "other"),
            ]
        )
        == 2
    )
    assert "calibrated otherwise than --observer (observer='reach' in the recipe)" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
    reuse = ["compile", str(tiny_model_dir), "--recipe", str(compiled / "recipe"), "-o", str(tmp_path / "other")]
    assert main([*reuse, "--calib-samples", "3"]) == 2  # nothing would read it
    assert capsys.readouterr().err.strip().endswith("drop --calib-samples, or drop --recipe to calibrate")
    assert not (tmp_path / "other").exists()


def test_same_compile_twice_gives_byte_identical_recipes_and_programs(compiled, tiny_model_dir, text_files, tmp_path):
    out = tmp_path / "twice"  # with --eval, as `compiled`: without it a compile holds windows out of calibration
    assert (
        main(
            [
                "compile",
                str(tiny_model_dir),
                "--fa-quant",
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
    names = ["recipe/recipe.json", "recipe/recipe.safetensors", "program.pt2", "decoder.pt2"]
    assert sorted(n for n in names if (out / n).is_file()) == sorted(n for n in names if (compiled / n).is_file())
    for name in names:
        if (out / name).is_file():
            assert (out / name).read_bytes() == (compiled / name).read_bytes(), name


def test_inspect_lists_the_sites(tiny_model_dir, capsys):
    assert main(["inspect", str(tiny_model_dir), "--json"]) == 0
    sites = json.loads(capsys.readouterr().out)
    assert [(s["layer"], s["num_heads"], s["num_kv_heads"], s["head_dim"], s["rope"]) for s in sites] == [
        (0, 4, 2, 16, True),
        (1, 4, 2, 16, True),
    ]
    assert sites[0]["k_from"] == "model.layers.0.self_attn.k_proj.weight"


def _config_copy(model_dir, p, **changes) -> str:
    """A copy of ``model_dir`` with ``changes`` in its config.json."""
    import shutil

    copy = p / "model"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **changes}))
    return str(copy)


def test_remote_code_of_a_known_architecture_loads_the_built_in_one(tiny_model_dir, tmp_path, capsys):
    model = _config_copy(tiny_model_dir, tmp_path, auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    before = {f.name: f.read_bytes() for f in (tmp_path / "model").iterdir()}
    capsys.readouterr()
    assert main(["inspect", model, "--json"]) == 0
    out, err = capsys.readouterr()
    assert len(json.loads(out)) == 2
    assert err.count("\n") == 1 and "loading the built-in llama architecture instead" in err
    assert {f.name: f.read_bytes() for f in (tmp_path / "model").iterdir()} == before  # the input is untouched


def test_exit_status_and_no_traceback_from_the_console_script(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qpass.cli",
            "compile",
            str(tmp_path / "missing"),
            "--kv-int8",
            "-o",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert result.stderr.startswith("qpass compile: error: MODEL")
