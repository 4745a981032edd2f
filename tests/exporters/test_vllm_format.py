"""``--format vllm`` (issue 25) without vLLM: what the directory holds, that qpass's reader measures exactly what the
compile measured, and the refusals (a model the paged op cannot run; a directory that is damaged). vLLM itself
reads these directories in tests/vllm."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qpass.cli import main

SMALL = ["--window", "64", "--calib-samples", "8", "--eval-windows", "2"]


def compile_vllm(model, text_files, out, *flags, eval_text=None):
    """A compile with the small settings; with ``eval_text``, over qpass's default window of 512, which a directory
    read back from its weights runs over."""
    extra = ["--eval", str(eval_text), "--window", "512"] if eval_text else []
    args = ["compile", str(model), *flags, "--calib", str(text_files["calib"]), "--format", "vllm"]
    assert main([*args, "-o", str(out), *SMALL, *extra]) == 0
    return out


def tensors(out) -> dict:
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_c8_and_faquant_grids_sit_at_vllms_attention_module(tiny_head64_dir, text_files, tmp_path):
    out = compile_vllm(tiny_head64_dir, text_files, tmp_path / "out", "--fa-quant", "--kv-int8")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {
        "quant_method": "qpass",
        "format_version": 1,
        "kv_cache": "static",
        "fa_quant": True,
        "symmetric": False,
        "linear": None,
    }
    t = tensors(out)
    a = "model.layers.1.self_attn.attn"
    for name, rows in (("c8_key", 2), ("c8_value", 2), ("fa_query", 4), ("fa_key", 2), ("fa_value", 2)):
        scale, offset = t[f"{a}.qpass_{name}_scale"], t[f"{a}.qpass_{name}_offset"]
        assert scale.dtype == offset.dtype == torch.float32 and scale.shape == offset.shape == (rows * 64,)
        assert (scale > 0).all() and torch.equal(offset, offset.round())
    assert t["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32  # no W8A8: float weights
    assert json.loads((out / "report.json").read_text())["export"]["format"] == "vllm"


def test_w8a8_alone_is_compressed_tensors_that_stock_vllm_reads(tiny_head64_dir, text_files, tmp_path):
    out = compile_vllm(tiny_head64_dir, text_files, tmp_path / "out", "--w8a8", "--dtype", "bfloat16")
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized"
    group = qc["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["input_activations"]["strategy"] == "tensor"
    assert "lm_head" in qc["ignore"] and config["torch_dtype"] == "bfloat16"
    t = tensors(out)
    p = "model.layers.0.mlp.down_proj"
    assert t[f"{p}.weight"].dtype == torch.int8 and t[f"{p}.weight_scale"].shape == (256, 1)
    assert t[f"{p}.input_scale"].dtype == torch.float32 and t[f"{p}.input_zero_point"].dtype == torch.int8
    assert t["model.norm.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "flags", [("--kv-int8",), ("--w8a8", "--fa-quant", "--kv-int8"), ("--kv-int8", "dynamic")], ids=str
)
def test_qpass_reads_back_exactly_what_the_compile_measured(flags, tiny_head64_dir, text_files, tmp_path, capsys):
    """The reader (W8A8 Linears from compressed-tensors' tensors, the grids as a recipe) measures the perplexity the
    compile reported for its program, on the same windows."""
    out = compile_vllm(tiny_head64_dir, text_files, tmp_path / "out", *flags, eval_text=text_files["prose"])
    compiled = json.loads((out / "report.json").read_text())["eval"]
    capsys.readouterr()
    args = ["eval", str(out), "--eval", str(text_files["prose"]), "--eval-windows", "2", "--no-float", "--json"]
    assert main(args) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["format"] == "vllm" and measured["window"] == 512
    assert measured["ppl_quant"] == pytest.approx(compiled["ppl_quant"], rel=1e-6)


def test_a_model_whose_attention_the_paged_op_cannot_run_is_refused(smollm2_tokenizer, text_files, tmp_path, capsys):
    """A sliding window (Mistral): vLLM would run it through qpass's backend over the whole context; one line, no
    directory."""
    from qpass.models.tiny import tiny_model

    model = tmp_path / "mistral"
    tiny_model("mistral", vocab_size=len(smollm2_tokenizer), hidden_size=256).save_pretrained(model)
    smollm2_tokenizer.save_pretrained(model)
    capsys.readouterr()  # the save's progress bar
    args = ["compile", str(model), "--kv-int8", "--calib", str(text_files["calib"]), "--format", "vllm"]
    assert main([*args, "-o", str(tmp_path / "out"), *SMALL]) == 2
    err = capsys.readouterr().err.strip()  # after the calibration's warning that the text is short: one error line
    last = err.splitlines()[-1]
    assert (
        last.startswith("qpass compile: error: --format vllm:") and "sliding window" in last and "Traceback" not in err
    )
    assert "--format qpass" in last and not (tmp_path / "out").exists()


def _damage(out, what):
    config = json.loads((out / "config.json").read_text())
    weights = load_file(str(out / "model.safetensors"))
    a = "model.layers.0.self_attn.attn.qpass_c8_key"
    if what == "version":
        config["quantization_config"]["format_version"] = 99
    elif what == "missing grid":
        del weights[f"{a}_offset"]
    elif what == "zero scale":
        weights[f"{a}_scale"][3] = 0.0
    elif what == "no quantization_config":
        del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    save_file(weights, str(out / "model.safetensors"), {"format": "pt"})


@pytest.mark.parametrize(
    "what, words",
    [
        ("version", "format_version 99: this qpass reads version 1"),
        ("missing grid", "missing tensor model.layers.0.self_attn.attn.qpass_c8_key_offset"),
        ("zero scale", "qpass_c8_key_scale has a scale that is not positive"),
        ("no quantization_config", "not a directory written by `qpass compile -o`"),
    ],
)
def test_a_damaged_directory_is_refused_in_one_line(what, words, tiny_head64_dir, text_files, tmp_path, capsys):
    out = compile_vllm(tiny_head64_dir, text_files, tmp_path / "out", "--kv-int8")
    _damage(out, what)
    capsys.readouterr()
    assert main(["eval", str(out), "--eval", str(text_files["prose"]), "--no-float"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
