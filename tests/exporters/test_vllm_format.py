"""``--format vllm`` (issue 25) without vLLM: what the directory holds, that qpass's reader measures exactly what the
compile measured, and the refusals (a model the paged op cannot run; a directory that is damaged). vLLM itself
reads these directories in tests/vllm."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qpass.cli import main
from qpass.exporters import vllm_format
from qpass.exporters.mindie_load import natural
from tests.helpers.mixed_w8a8 import DYNAMIC, mixed_recipe_dir

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
    assert list(qc["config_groups"]) == ["group_0"] and group["targets"] == ["Linear"]  # no mix: one group
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


# llm-compressor 0.14's quantization_config for its W8A8 int8 recipe, as `oneshot` wrote it for SmolLM2 (compressed-
# tensors 0.19): more fields than qpass writes, and no report.json beside it (tools/bench_llmcompressor.py reads such a
# checkpoint with qpass's evaluator).
LLMC_ARGS = {"actorder": None, "block_structure": None, "group_size": None, "num_bits": 8, "observer_kwargs": {}}
LLMC_ARGS |= {"scale_dtype": None, "symmetric": True, "type": "int", "zp_dtype": None}
LLMC_W8A8 = {
    "config_groups": {
        "group_0": {
            "format": "int-quantized",
            "input_activations": {**LLMC_ARGS, "dynamic": True, "observer": None, "strategy": "token"},
            "output_activations": None,
            "targets": ["Linear"],
            "weights": {**LLMC_ARGS, "dynamic": False, "observer": "memoryless_minmax", "strategy": "channel"},
        }
    },
    "format": "int-quantized",
    "global_compression_ratio": None,
    "ignore": ["lm_head"],
    "kv_cache_scheme": None,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
    "sparsity_config": {},
    "transform_config": {},
    "version": "0.19.0",
}


def test_another_tools_compressed_tensors_w8a8_dynamic_checkpoint_is_read(
    tiny_head64_dir, text_files, tmp_path, capsys
):
    """A W8A8 checkpoint in llm-compressor's layout (int8 ``weight``, float32 ``weight_scale [n, 1]`` per Linear,
    ``lm_head`` float): qpass evaluates it, and its perplexity is the float model's with each Linear's weight
    dequantized and its input rounded per token (symmetric, absmax / 127), computed here by hand."""
    from transformers import AutoModelForCausalLM

    from qpass.core.data import token_windows

    model = AutoModelForCausalLM.from_pretrained(tiny_head64_dir, dtype=torch.float32).eval()
    out = tmp_path / "llmc"
    tied = model.config.tie_word_embeddings  # then lm_head.weight is not written, as llm-compressor writes it
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            scale = module.weight.detach().abs().amax(dim=1, keepdim=True) / 127
            code = torch.round(module.weight.detach() / scale).clamp(-128, 127).to(torch.int8)
            weights[f"{name}.weight"], weights[f"{name}.weight_scale"] = code, scale.float()
            module.weight.data = code.float() * scale  # the reference: dequantized weights ...
            module.register_forward_pre_hook(lambda _, args: (_per_token(args[0]),))  # ... and rounded inputs
    model.config.quantization_config = LLMC_W8A8
    model.config.save_pretrained(out)
    save_file(weights, str(out / "model.safetensors"), {"format": "pt"})
    (out / "recipe.yaml").write_text("default_stage: {}\n")  # llm-compressor writes its recipe beside the weights
    for f in tiny_head64_dir.iterdir():
        if f.name.startswith("tokenizer"):
            (out / f.name).write_bytes(f.read_bytes())

    capsys.readouterr()
    args = ["eval", str(out), "--eval", str(text_files["prose"]), "--eval-windows", "2", "--no-float", "--json"]
    assert main(args) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["format"] == "vllm" and measured["w8a8_linears"] == 14 and measured["window"] == 512

    from transformers import AutoTokenizer

    ids = token_windows(AutoTokenizer.from_pretrained(out), [text_files["prose"].read_text()], 512, 2, "--eval")
    with torch.no_grad():
        logits = model(ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert measured["ppl_quant"] == pytest.approx(float(torch.exp(nll)), rel=1e-4)


def _per_token(x: torch.Tensor) -> torch.Tensor:
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.round(x / scale).clamp(-127, 127) * scale


# ------------------------------------------------------------------------------ static and per-token Linears


@pytest.fixture(scope="module")
def mixed(tiny_head64_dir, text_files, tmp_path_factory):
    """``--format vllm`` (float32) of a static W8A8 recipe with per-token Linears (tests/helpers/mixed_w8a8.py),
    evaluated by the compile on prose over 512-token windows."""
    work = tmp_path_factory.mktemp("mixed")
    recipe = str(mixed_recipe_dir(tiny_head64_dir, text_files, work))
    args = ["compile", str(tiny_head64_dir), "--recipe", recipe, "--format", "vllm", "-o", str(work / "out")]
    assert main([*args, "--eval", str(text_files["prose"]), "--window", "512", "--eval-windows", "2"]) == 0
    return work / "out"


def test_static_and_per_token_linears_are_two_groups_that_target_module_paths(mixed):
    qc = json.loads((mixed / "config.json").read_text())["quantization_config"]
    t = tensors(mixed)
    linears = sorted((n.removesuffix(".weight_scale") for n in t if n.endswith(".weight_scale")), key=natural)
    static, dynamic = [p for p in linears if p not in DYNAMIC], [p for p in linears if p in DYNAMIC]
    assert len(linears) == 14 and dynamic == sorted(DYNAMIC, key=natural)
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
    acts = {"num_bits": 8, "type": "int"}
    assert qc["config_groups"] == {
        "group_0": {
            "targets": static,
            "weights": weights,
            "input_activations": {**acts, "symmetric": False, "strategy": "tensor", "dynamic": False},
        },
        "group_1": {
            "targets": dynamic,
            "weights": weights,
            "input_activations": {**acts, "symmetric": True, "strategy": "token", "dynamic": True},
        },
    }
    assert qc["ignore"] == ["lm_head", "model.embed_tokens"]
    for p in linears:
        has = {s for s in ("input_scale", "input_zero_point") if f"{p}.{s}" in t}
        assert has == (set() if p in DYNAMIC else {"input_scale", "input_zero_point"}), p
        assert t[f"{p}.weight"].dtype == torch.int8 and t[f"{p}.weight_scale"].dtype == torch.float32


def test_the_reader_runs_each_linear_by_its_groups_scheme_and_measures_the_program(mixed, text_files, capsys):
    """Each Linear comes back in its group's form, and ``qpass eval`` on the directory measures the perplexity the
    compile measured for qpass's own program of the mixed recipe (float32 throughout: equal to 1e-6)."""
    from qpass.runtime.w8a8 import W8A8DynamicLinear, W8A8Linear

    loaded = vllm_format.load(mixed, build=True)
    forms = {n: type(m) for n, m in loaded.model.named_modules() if isinstance(m, (W8A8Linear, W8A8DynamicLinear))}
    assert len(forms) == 14 and {n for n, f in forms.items() if f is W8A8DynamicLinear} == set(DYNAMIC)
    compiled = json.loads((mixed / "report.json").read_text())["eval"]
    capsys.readouterr()
    args = ["eval", str(mixed), "--eval", str(text_files["prose"]), "--eval-windows", "2", "--no-float", "--json"]
    assert main(args) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["window"] == 512 and measured["ppl_quant"] == pytest.approx(compiled["ppl_quant"], rel=1e-6)


def test_one_kind_of_activations_is_still_one_group_targeting_linear():
    """Without a mix the config is the one qpass always wrote (stock vLLM and llm-compressor's form)."""
    for static, dynamic, kind in ((["m.a", "m.b"], [], "static"), ([], ["m.a", "m.b"], "dynamic")):
        qc = vllm_format._linear_config(static, dynamic, ["m.c"])
        assert list(qc["config_groups"]) == ["group_0"] and qc["ignore"] == ["lm_head", "m.c"]
        assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
        assert qc["config_groups"]["group_0"]["input_activations"] == vllm_format.ACTIVATIONS[kind]
    assert vllm_format._linear_config([], [], ["m.c"]) is None


def test_a_fused_group_of_static_and_per_token_linears_is_refused(tiny_head64_dir, text_files, tmp_path, capsys):
    recipe = mixed_recipe_dir(tiny_head64_dir, text_files, tmp_path, linears=["model.layers.0.self_attn.v_proj"])
    capsys.readouterr()
    args = ["compile", str(tiny_head64_dir), "--recipe", str(recipe), "--format", "vllm", "-o", str(tmp_path / "out")]
    assert main([*args, "--window", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "vLLM runs model.layers.0.self_attn.q_proj, " in err, err
    assert "with per-token activations; recalibrate" in err and not (tmp_path / "out").exists()


def _regroup(out, edit):
    config = json.loads((out / "config.json").read_text())
    edit(config["quantization_config"])
    (out / "config.json").write_text(json.dumps(config))


def _move(qc, target, source, to):
    qc["config_groups"][source]["targets"].remove(target)
    qc["config_groups"][to]["targets"].append(target)


QKV0 = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj")


@pytest.mark.parametrize(
    "edit, words",
    [
        (
            lambda qc: qc["config_groups"]["group_0"]["targets"].append("Linear"),
            "qpass reads the class name 'Linear' as the one target of one group",
        ),
        (
            lambda qc: qc["config_groups"]["group_1"]["targets"].remove("model.layers.0.mlp.down_proj"),
            "model.layers.0.mlp.down_proj holds W8A8 tensors, but config.json's quantization_config ignores it or "
            "targets it with no config group",
        ),
        (
            lambda qc: _move(qc, QKV0[1], "group_1", "group_0"),
            f"gives {', '.join(QKV0)} different config groups (dynamic, static, dynamic)",
        ),
        (
            lambda qc: qc["config_groups"]["group_0"]["targets"].append(QKV0[0]),
            f"targets '{QKV0[0]}' in two config groups",
        ),
        (
            lambda qc: qc["ignore"].append("model.layers.1.mlp.up_proj"),
            "ignores model.layers.1.mlp.up_proj but not model.layers.1.mlp.gate_proj",
        ),
        (
            lambda qc: qc["config_groups"]["group_1"]["input_activations"].update(symmetric=False),
            "is not one qpass reads (8-bit int, static asymmetric per tensor or dynamic symmetric per token)",
        ),
    ],
    ids=["Linear beside paths", "untargeted", "fused split", "twice", "ignored in part", "asymmetric per token"],
)
def test_a_config_whose_groups_qpass_cannot_resolve_is_refused_in_one_line(mixed, tmp_path, capsys, edit, words):
    out = tmp_path / "out"
    shutil.copytree(mixed, out)
    _regroup(out, edit)
    capsys.readouterr()
    assert main(["eval", str(out), "--eval", str(out / "report.txt"), "--no-float"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
