"""MindIE weight directory: export layout, round trips, hand-written directories, corruptions, CLI, size."""

import copy
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qpass.api import CompileResult, evaluate_saved
from qpass.cli import main
from qpass.core.config import QuantConfig
from qpass.core.errors import QpassError
from qpass.core.evaluate import perplexity
from qpass.core.recipe import Recipe
from qpass.exporters.mindie_format import DESCRIPTION_FILE, WEIGHTS_FILE
from qpass.exporters.mindie_load import load as load_mindie
from qpass.exporters.mindie_write import export_mindie
from qpass.exporters.registry import Compiled
from qpass.frontends.torch_export.decoder import generate_with_model
from qpass.models.tiny import tiny_config, tiny_model
from qpass.runtime.w8a8 import W8A8DynamicLinear, W8A8DynamicWeights, W8A8Linear, w8a8_weights
from tests.helpers.frontend_cases import calibrated, frontend, minmax_input_qparams
from tests.helpers.mixed_w8a8 import DYNAMIC, splice_static_linear, with_dynamic_linears

COMBOS = {"w8a8": (False, False), "w8a8+fa": (True, False), "w8a8+c8": (False, True), "w8a8+fa+c8": (True, True)}
WINDOW = 64


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: OpenMP thrashes otherwise
    yield
    torch.set_num_threads(threads)


def config_for(fa: bool, kv: bool) -> QuantConfig:
    return QuantConfig(fa_quant=fa, kv_cache="static" if kv else None, w8a8=True)


def full_recipe(model, ids) -> Recipe:
    """FAQuant, C8 and W8A8 tensors for ``model``; :func:`variant` picks what a config asks for."""
    _, recipe = calibrated(model, ids, fa_quant=True, kv_cache="static")
    return recipe.replace(tensors={**recipe.tensors, **minmax_input_qparams(model, [ids])})


def variant(recipe: Recipe, fa: bool, kv: bool) -> Recipe:
    return Recipe(config_for(fa, kv), recipe.sites, dict(recipe.tensors))


@pytest.fixture(scope="module")
def llama(smollm2_tokenizer):
    """Tiny Llama (head_dim 64, so the paged ops can lower it; tied embeddings like SmolLM2) and its recipe."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", vocab_size=len(smollm2_tokenizer), hidden_size=256)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, len(smollm2_tokenizer), (4, WINDOW), generator=torch.Generator().manual_seed(1))
    return model, full_recipe(model, ids), ids


@pytest.fixture(scope="module")
def exported(llama, smollm2_tokenizer, tmp_path_factory):
    """W8A8 + FAQuant + C8, float16: the directory the corruption and CLI tests start from."""
    model, recipe, _ = llama
    out = tmp_path_factory.mktemp("mindie") / "fp16-all"
    export_mindie(
        model.config.to_dict(), model.state_dict(), variant(recipe, True, True), smollm2_tokenizer, out, torch.float16
    )
    return out


def in_memory_w8a8(model, recipe: Recipe, dtype: torch.dtype | None) -> tuple[torch.nn.Module, Recipe]:
    """The W8A8 model and attention recipe built in memory from float32 tensors; with ``dtype``, every float
    tensor the format stores in the model dtype (float parameters, input_scale, FAQuant/C8) rounded to it."""
    m = copy.deepcopy(model)
    rounded = (lambda t: t.to(dtype).float()) if dtype is not None else (lambda t: t)
    for name in recipe.w8a8_linears():
        linear = model.get_submodule(name)
        if recipe.activations(name) == "dynamic":  # per token: int8 weights on the (rounded) per-channel scale
            weight = linear.weight.detach().float()
            scale = rounded(weight.abs().amax(1) / 127)
            bias = torch.zeros(len(weight)) if linear.bias is None else rounded(linear.bias.detach().float())
            code = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
            made = W8A8DynamicLinear(W8A8DynamicWeights(code, scale, bias))
        else:
            w = w8a8_weights(
                linear.weight,
                linear.bias,
                rounded(recipe.tensors[f"w8a8.{name}.input_scale"]).item(),
                recipe.tensors[f"w8a8.{name}.input_offset"].item(),
            )
            made = W8A8Linear(w)
        parent, _, child = name.rpartition(".")
        setattr(m.get_submodule(parent), child, made)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(rounded(p))
    tensors = {k: rounded(v) for k, v in recipe.tensors.items()}
    fa, kv = recipe.config.fa_quant, recipe.config.kv_cache
    attention = QuantConfig(fa_quant=fa, kv_cache=kv) if (fa or kv) else None  # the Linears are W8A8 already
    return m, Recipe(attention, recipe.sites, tensors)


def program_ppl(model, recipe: Recipe | None, ids) -> float:
    return perplexity(
        frontend(model, WINDOW).logits(recipe if recipe is not None and recipe.config is not None else None), ids, 4
    )


# ------------------------------------------------------------------------------------------------ layout


# every combination in both dtypes, except C8 with bfloat16, which the format refuses (test_c8_bfloat16_refused)
LAYOUTS = [
    pytest.param(c, d, id=f"{c}-{str(d)[6:]}")
    for d in (torch.float16, torch.bfloat16)
    for c in COMBOS
    if not (COMBOS[c][1] and d == torch.bfloat16)
]


@pytest.mark.parametrize("combo, dtype", LAYOUTS)
def test_export_layout_and_round_trip(llama, smollm2_tokenizer, tmp_path, combo, dtype):
    model, full, _ = llama
    fa, kv = COMBOS[combo]
    recipe = variant(full, fa, kv)
    export_mindie(model.config.to_dict(), model.state_dict(), recipe, smollm2_tokenizer, tmp_path, dtype)
    assert {"config.json", WEIGHTS_FILE, DESCRIPTION_FILE, "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    tensors = load_file(str(tmp_path / WEIGHTS_FILE))
    desc = json.loads((tmp_path / DESCRIPTION_FILE).read_text())
    config = json.loads((tmp_path / "config.json").read_text())
    # model-level keys and config.json
    assert desc["model_quant_type"] == "W8A8"
    assert desc.get("fa_quant_type") == ("FAQuant" if fa else None)
    assert (desc.get("kv_cache_type"), desc.get("kv_quant_type")) == (("C8", "C8") if kv else (None, None))
    assert config["torch_dtype"] == str(dtype).removeprefix("torch.")
    assert config["quantization_config"] == {
        **({"fa_quant_type": "FAQuant"} if fa else {}),
        **({"kv_quant_type": "C8"} if kv else {}),
    }
    model_keys = {k for k in desc if k.endswith("_type")}
    assert set(desc) - model_keys == set(tensors)  # every tensor typed, nothing else
    # W8A8 Linears: 7 per layer, each with the format's tensors
    linears = recipe.w8a8_linears()
    assert len(linears) == 14
    for p in linears:
        n, k = model.get_submodule(p).weight.shape
        expect = {
            "weight": (torch.int8, (n, k)),
            "input_scale": (dtype, (1,)),
            "input_offset": (dtype, (1,)),
            "deq_scale": (torch.int64 if dtype == torch.float16 else torch.float32, (n,)),
            "quant_bias": (torch.int32, (n,)),
            "weight_scale": (torch.float32, (n, 1)),
            "weight_offset": (torch.float32, (n, 1)),
        }
        for suffix, (dt, shape) in expect.items():
            t = tensors[f"{p}.{suffix}"]
            assert (t.dtype, tuple(t.shape)) == (dt, shape), f"{p}.{suffix}"
            assert desc[f"{p}.{suffix}"] == "W8A8"
        deq = tensors[f"{p}.deq_scale"]
        deq = deq.to(torch.int32).view(torch.float32) if dtype == torch.float16 else deq
        in_scale = tensors[f"{p}.input_scale"].float()
        torch.testing.assert_close(deq, in_scale * tensors[f"{p}.weight_scale"].reshape(n), rtol=0, atol=0)
        assert in_scale.item() == pytest.approx(full.tensors[f"w8a8.{p}.input_scale"].item(), rel=1e-2)
        offset = tensors[f"{p}.input_offset"].float()
        assert offset.item() == full.tensors[f"w8a8.{p}.input_offset"].item()  # unchanged: one sign convention
        expected_bias = torch.round(-tensors[f"{p}.weight"].double().sum(1) * offset.double()).to(
            torch.int32
        )  # Llama: no bias
        assert torch.equal(tensors[f"{p}.quant_bias"], expected_bias)
        assert not tensors[f"{p}.weight_offset"].any()
        assert f"{p}.bias" not in tensors
    # float tensors in the model dtype; tied lm_head not written (config.json ties it)
    floats = [k for k, v in desc.items() if v == "FLOAT"]
    assert "model.embed_tokens.weight" in floats and "model.norm.weight" in floats and "lm_head.weight" not in tensors
    assert all(tensors[k].dtype == dtype for k in floats)
    assert config["tie_word_embeddings"] is True
    # attention tensors, named and shaped as the format says, offsets as the recipe has them
    for i in range(2):
        a = f"model.layers.{i}.self_attn"
        for kind, heads in (("fa_q", 4), ("fa_k", 2), ("fa_v", 2)):
            for part in ("scale", "offset"):
                name = f"{a}.{kind}.{part}"
                assert (name in tensors) == fa
                if fa:
                    assert (tensors[name].dtype, tuple(tensors[name].shape), desc[name]) == (
                        dtype,
                        (heads, 64),
                        "FAQuant",
                    )
                    assert torch.equal(tensors[name], full.tensors[f"layers.{i}.{kind}.{part}"].to(dtype))
        for kind, proj in (("kv_k", "k_proj"), ("kv_v", "v_proj")):
            for part in ("scale", "offset"):
                name = f"{a}.{proj}.kv_cache_{part}"
                assert (name in tensors) == kv
                if kv:
                    assert (tensors[name].dtype, tuple(tensors[name].shape), desc[name]) == (dtype, (128,), "W8A8")
                    assert torch.equal(tensors[name], full.tensors[f"layers.{i}.{kind}.{part}"].to(dtype))
    # load back: the recipe carries the same numbers (offsets with the same sign), the Linears are integer
    loaded = load_mindie(tmp_path)
    assert loaded.info["model_dtype"] == str(dtype).removeprefix("torch.")
    assert sorted(n for n, m in loaded.model.named_modules() if isinstance(m, W8A8Linear)) == linears
    assert sum(isinstance(m, W8A8Linear) for m in loaded.model.modules()) == 14
    assert isinstance(loaded.model.lm_head, torch.nn.Linear)
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()
    if not (fa or kv):
        assert loaded.recipe is None
    else:
        assert (loaded.recipe.config.fa_quant, loaded.recipe.config.kv_cache) == (fa, "static" if kv else None)
        for name, t in loaded.recipe.tensors.items():
            assert torch.equal(t, full.tensors[name].to(dtype).float()), name


def test_c8_bfloat16_refused(llama, tmp_path):
    model, full, _ = llama
    with pytest.raises(QpassError, match="bfloat16 with --kv-int8.*float16"):
        export_mindie(
            model.config.to_dict(), model.state_dict(), variant(full, False, True), None, tmp_path, torch.bfloat16
        )


def test_refuses_recipe_without_w8a8_and_other_dtypes(llama, tmp_path):
    model, full, _ = llama
    no_w8a8 = Recipe(
        QuantConfig(fa_quant=True), full.sites, {k: v for k, v in full.tensors.items() if not k.startswith("w8a8.")}
    )
    with pytest.raises(QpassError, match="the MindIE format is W8A8; add --w8a8"):
        export_mindie(model.config.to_dict(), model.state_dict(), no_w8a8, None, tmp_path, torch.float16)
    with pytest.raises(QpassError, match="float16 or bfloat16"):
        export_mindie(
            model.config.to_dict(), model.state_dict(), variant(full, True, False), None, tmp_path, torch.float32
        )


def test_export_is_deterministic(llama, smollm2_tokenizer, exported, tmp_path):
    model, full, _ = llama
    export_mindie(
        model.config.to_dict(),
        model.state_dict(),
        variant(full, True, True),
        smollm2_tokenizer,
        tmp_path,
        torch.float16,
    )
    names = sorted(p.name for p in exported.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir())
    for name in names:
        assert (exported / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_size_of_quantized_linears(exported, llama):
    """int8 weights + per-channel tensors of the W8A8 Linears vs those Linears' float32 weights."""
    model, full, _ = llama
    linears = full.w8a8_linears()
    with safe_open(str(exported / WEIGHTS_FILE), framework="pt") as f:
        exported_bytes = sum(
            f.get_tensor(f"{p}.{s}").nbytes
            for p in linears
            for s in (
                "weight",
                "input_scale",
                "input_offset",
                "deq_scale",
                "quant_bias",
                "weight_scale",
                "weight_offset",
            )
        )
    float32_bytes = sum(model.get_submodule(p).weight.numel() * 4 for p in linears)
    ratio = exported_bytes / float32_bytes
    print(f"quantized Linears: {exported_bytes} bytes vs {float32_bytes} float32 bytes = {ratio:.3f}x")
    assert ratio <= 0.30


# ---------------------------------------------------------------------------------------------- numbers


def test_reloaded_perplexity_matches_in_memory(llama, exported):
    """Reloaded float16 directory vs (a) the in-memory W8A8 + FAQuant + C8 program built from the same
    float16-rounded tensors (must agree to 1e-6: the format loses nothing more), and (b) the in-memory
    program in float32 throughout (within 0.1%: what storing float16 costs)."""
    model, full, ids = llama
    recipe = variant(full, True, True)
    loaded = load_mindie(exported, load_tokenizer=False)
    ppl_loaded = perplexity(frontend(loaded.model, WINDOW).logits(loaded.recipe), ids, 4)
    ppl_fp16 = program_ppl(*in_memory_w8a8(model, recipe, torch.float16), ids)
    ppl_fp32 = program_ppl(*in_memory_w8a8(model, recipe, None), ids)
    print(f"ppl reloaded {ppl_loaded:.6f}, in-memory fp16-rounded {ppl_fp16:.6f}, in-memory float32 {ppl_fp32:.6f}")
    assert abs(ppl_loaded / ppl_fp16 - 1) < 1e-6
    assert abs(ppl_loaded / ppl_fp32 - 1) < 1e-3


def test_float_linears_stay_float(llama, tmp_path):
    """A Linear the layer fallback kept in float is written FLOAT even when the recipe has its input qparams."""
    model, full, _ = llama
    recipe = variant(full, False, False)
    down = "model.layers.1.mlp.down_proj"
    recipe = recipe.replace(w8a8={"float_linears": {down: "widest activation range"}, "smooth": []})
    export_mindie(model.config.to_dict(), model.state_dict(), recipe, None, tmp_path, torch.float16)
    desc = json.loads((tmp_path / DESCRIPTION_FILE).read_text())
    assert desc[f"{down}.weight"] == "FLOAT" and f"{down}.deq_scale" not in desc
    loaded = load_mindie(tmp_path, load_tokenizer=False)
    assert isinstance(loaded.model.get_submodule(down), torch.nn.Linear) and loaded.info["w8a8_linears"] == 13


def test_qwen2_bias_round_trip(smollm2_tokenizer, tmp_path):
    """Qwen2's q/k/v biases go into quant_bias; the reloaded logits equal the in-memory W8A8 model's."""
    model = tiny_model("qwen2", vocab_size=512)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(2))
    recipe = Recipe(config_for(False, False), [], minmax_input_qparams(model, [ids]))
    export_mindie(model.config.to_dict(), model.state_dict(), recipe, None, tmp_path, torch.bfloat16)
    tensors = load_file(str(tmp_path / WEIGHTS_FILE))
    assert "model.layers.0.self_attn.q_proj.bias" not in tensors
    assert tensors["model.layers.0.self_attn.q_proj.quant_bias"].abs().max() > 0
    loaded = load_mindie(tmp_path, load_tokenizer=False)
    reference, _ = in_memory_w8a8(model, recipe, torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


def test_w8a8_alone_generates_with_float_cache(llama, smollm2_tokenizer, tmp_path):
    model, full, _ = llama
    export_mindie(
        model.config.to_dict(),
        model.state_dict(),
        variant(full, False, False),
        smollm2_tokenizer,
        tmp_path,
        torch.float16,
    )
    loaded = load_mindie(tmp_path)
    assert loaded.recipe is None
    new = generate_with_model(loaded.model, [1, 2, 3, 4], 5, loaded.tokenizer.eos_token_id)
    reference, _ = in_memory_w8a8(model, full, torch.float16)
    ids = [1, 2, 3, 4]
    with torch.no_grad():
        for _ in range(len(new)):
            ids.append(int(reference(torch.tensor([ids])).logits[0, -1].argmax()))
    assert new == ids[4:]


# ------------------------------------------------------------------------------ static and per-token Linears


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_static_and_per_token_linears_each_in_its_form_run_the_program(llama, tmp_path, dtype):
    """Static W8A8 with per-token Linears: each dynamic one in msModelSlim's W8A8_DYNAMIC form, each static one in
    W8A8's, typed per tensor under ``"model_quant_type": "W8A8"``. Read back, each Linear runs in its own form: the
    perplexity is the in-memory program's built from the same rounded tensors (1e-6) and qpass's own float32
    program's (0.1%: what storing the model dtype costs), which the mix moves away from the all-static one's."""
    model, full, ids = llama
    static = variant(full, False, False)
    recipe = with_dynamic_linears(static)
    export_mindie(model.config.to_dict(), model.state_dict(), recipe, None, tmp_path, dtype)
    tensors = load_file(str(tmp_path / WEIGHTS_FILE))
    desc = json.loads((tmp_path / DESCRIPTION_FILE).read_text())
    assert desc["model_quant_type"] == "W8A8" and set(desc) - {"model_quant_type"} == set(tensors)
    linears = recipe.w8a8_linears()
    assert len(linears) == 14 and set(DYNAMIC) < set(linears)
    deq = torch.int64 if dtype == torch.float16 else torch.float32
    for p in linears:
        n, k = model.get_submodule(p).weight.shape
        if p in DYNAMIC:
            kind, absent = "W8A8_DYNAMIC", ("input_scale", "input_offset", "deq_scale", "quant_bias")
            expect = {"weight": (torch.int8, (n, k)), "weight_scale": (dtype, (n, 1)), "weight_offset": (dtype, (n, 1))}
        else:
            kind, absent = "W8A8", ()
            expect = {"weight": (torch.int8, (n, k)), "input_scale": (dtype, (1,)), "input_offset": (dtype, (1,))}
            expect |= {"deq_scale": (deq, (n,)), "quant_bias": (torch.int32, (n,))}
        for suffix, (dt, shape) in expect.items():
            t = tensors[f"{p}.{suffix}"]
            assert (t.dtype, tuple(t.shape), desc[f"{p}.{suffix}"]) == (dt, shape, kind), f"{p}.{suffix}"
        assert not [s for s in absent if f"{p}.{s}" in tensors], p
    loaded = load_mindie(tmp_path, load_tokenizer=False)
    forms = {n: type(m) for n, m in loaded.model.named_modules() if isinstance(m, (W8A8Linear, W8A8DynamicLinear))}
    assert forms == {p: W8A8DynamicLinear if p in DYNAMIC else W8A8Linear for p in linears}
    ppl_loaded = perplexity(frontend(loaded.model, WINDOW).logits(None), ids, 4)
    ppl_rounded = program_ppl(*in_memory_w8a8(model, recipe, dtype), ids)
    ppl_program, ppl_static = program_ppl(model, recipe, ids), program_ppl(model, static, ids)
    print(f"ppl reloaded {ppl_loaded:.6f}, rounded {ppl_rounded:.6f}, program {ppl_program:.6f} (static {ppl_static})")
    assert abs(ppl_loaded / ppl_rounded - 1) < 1e-6
    assert abs(ppl_program / ppl_static - 1) > 1e-4  # the mix changes the numbers ...
    assert abs(ppl_loaded / ppl_program - 1) < 1e-3  # ... and the directory runs the mixed program's


@pytest.mark.parametrize("target", ["mindie", "vllm-ascend"])
def test_a_fused_group_of_static_and_per_token_linears_is_refused_in_one_line(llama, tmp_path, target):
    model, full, _ = llama
    recipe = with_dynamic_linears(variant(full, False, False), ["model.layers.1.self_attn.k_proj"])
    with pytest.raises(QpassError) as err:
        export_mindie(model.config.to_dict(), model.state_dict(), recipe, None, tmp_path / "out", torch.float16, target)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"--format {target}: ")
    a = "model.layers.1.self_attn"
    assert f"{a}.q_proj, {a}.k_proj, {a}.v_proj as one fused layer" in message
    assert f"quantizes {a}.q_proj, {a}.v_proj with static and {a}.k_proj with per-token" in message
    assert "recalibrate" in message and not (tmp_path / "out").exists()


def test_the_reader_refuses_fused_linears_of_two_types(llama, tmp_path):
    """A directory (not qpass's: spliced by hand) whose q_proj is W8A8 beside a W8A8_DYNAMIC k_proj and v_proj."""
    model, full, _ = llama
    static = variant(full, False, False)
    for name, recipe in (("static", static), ("mixed", with_dynamic_linears(static))):
        export_mindie(model.config.to_dict(), model.state_dict(), recipe, None, tmp_path / name, torch.float16)
    load_mindie(tmp_path / "mixed", load_tokenizer=False)
    splice_static_linear(tmp_path / "mixed", tmp_path / "static", "model.layers.0.self_attn.q_proj")
    with pytest.raises(QpassError, match="fuse into one layer of one quant type; type the fused Linears alike"):
        load_mindie(tmp_path / "mixed", load_tokenizer=False)


# ------------------------------------------------------------------------------------------- hand-written


def write_by_hand(model, tokenizer, out, fa: bool, c8: bool = False, msmodelslim: bool = False):
    """A float16 directory written straight from the format's table (no qpass exporter code). ``msmodelslim``:
    in the form msModelSlim's current saver writes (no quantization_config, no weight_scale/weight_offset,
    float32 input_scale/input_offset, the Linears' float biases kept, C8 tensors typed C8, FAQuant one value
    per head [heads, 1] with int8 offsets, fa_quant_type FAKQuant, per-module quant_type strings, and the
    tied LM head typed FLOAT without a tensor)."""
    out.mkdir()
    tensors, desc = {}, {"model_quant_type": "W8A8"}
    g = torch.Generator().manual_seed(3)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            w = module.weight.detach().float()
            w_scale = w.abs().amax(1) / 127
            wq = torch.round(w / w_scale[:, None]).to(torch.int8)
            in_scale = torch.tensor([0.02 + 0.01 * torch.rand(1, generator=g).item()]).half()
            in_offset = torch.tensor([-3.0]).half()
            deq = in_scale.float() * w_scale
            quant_bias = torch.round(-wq.double().sum(1) * -3.0).to(torch.int32)
            import numpy as np

            deq_bits = torch.from_numpy(deq.numpy().astype(np.float32).view(np.int32).astype(np.int64))
            parts = [
                ("weight", wq),
                ("input_scale", in_scale),
                ("input_offset", in_offset),
                ("deq_scale", deq_bits),
                ("quant_bias", quant_bias),
                ("weight_scale", w_scale[:, None]),
                ("weight_offset", torch.zeros(len(w), 1)),
            ]
            if msmodelslim:
                parts = [(k, t.float() if k.startswith("input_") else t) for k, t in parts[:5]]
                tensors[f"{name}.bias"], desc[f"{name}.bias"] = torch.zeros(len(w)).half(), "FLOAT"
            for suffix, t in parts:
                tensors[f"{name}.{suffix}"] = t
                desc[f"{name}.{suffix}"] = "W8A8"
    for name, p in model.state_dict().items():
        if not name.endswith("proj.weight") and name != "lm_head.weight":
            tensors[name] = p.half()
            desc[name] = "FLOAT"
    qc = {}
    if fa:
        desc["fa_quant_type"] = qc["fa_quant_type"] = "FAKQuant" if msmodelslim else "FAQuant"
        for i in range(model.config.num_hidden_layers):
            for kind, heads in (("fa_q", 4), ("fa_k", 2), ("fa_v", 2)):
                a = f"model.layers.{i}.self_attn"
                shape = (heads, 1) if msmodelslim else (heads, 64)
                tensors[f"{a}.{kind}.scale"] = torch.full(
                    shape, 0.0625, dtype=torch.float32 if msmodelslim else torch.float16
                )
                tensors[f"{a}.{kind}.offset"] = torch.zeros(shape, dtype=torch.int8 if msmodelslim else torch.float16)
                desc[f"{a}.{kind}.scale"] = desc[f"{a}.{kind}.offset"] = "FAQuant"
                if msmodelslim:
                    desc[f"{a}.{kind}.quant_type"] = "FAKQuant"
    if c8:
        desc["kv_cache_type"] = qc["kv_quant_type"] = "C8"
        if not msmodelslim:
            desc["kv_quant_type"] = "C8"
        for i in range(model.config.num_hidden_layers):
            for proj in ("k_proj", "v_proj"):
                name = f"model.layers.{i}.self_attn.{proj}"
                tensors[f"{name}.kv_cache_scale"] = torch.full((128,), 0.03125).half()
                tensors[f"{name}.kv_cache_offset"] = torch.zeros(128).half()
                desc[f"{name}.kv_cache_scale"] = desc[f"{name}.kv_cache_offset"] = "C8" if msmodelslim else "W8A8"
    if msmodelslim:
        desc["lm_head.weight"] = "FLOAT"
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / DESCRIPTION_FILE).write_text(json.dumps(desc))
    config = {**model.config.to_dict(), "torch_dtype": "float16"}
    if not msmodelslim:
        config["quantization_config"] = qc
    config.pop("dtype", None)
    (out / "config.json").write_text(json.dumps(config))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
        (out / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("fa, c8", [(True, False), (False, True)])
def test_msmodelslim_form_reads_like_the_documented_form(llama, tmp_path, fa, c8):
    """msModelSlim's current saver's directory runs the same numbers as MindIE's documented form of the same model."""
    model, _, ids = llama
    write_by_hand(model, None, tmp_path / "doc", fa=fa, c8=c8)
    write_by_hand(model, None, tmp_path / "slim", fa=fa, c8=c8, msmodelslim=True)
    doc, slim = (load_mindie(tmp_path / d, load_tokenizer=False) for d in ("doc", "slim"))
    assert slim.info == doc.info and slim.info["w8a8_linears"] == 14
    assert (slim.recipe.config.fa_quant, slim.recipe.config.kv_cache) == (fa, "static" if c8 else None)
    for name, t in doc.recipe.tensors.items():
        assert torch.equal(slim.recipe.tensors[name], t), name  # [heads, 1] repeated over head_dim
    with torch.no_grad():
        torch.testing.assert_close(
            frontend(slim.model, WINDOW).logits(slim.recipe)(ids[:1]),
            frontend(doc.model, WINDOW).logits(doc.recipe)(ids[:1]),
            rtol=1e-3,
            atol=1e-3,
        )


def test_hand_written_directory_loads_and_matches_the_formula(llama, tmp_path):
    model, _, ids = llama
    write_by_hand(model, None, tmp_path / "hand", fa=False)
    loaded = load_mindie(tmp_path / "hand", load_tokenizer=False)
    assert loaded.info["w8a8_linears"] == 14 and loaded.recipe is None
    # float64 reference of the format's inference formula on the first Linear's input
    torch.manual_seed(0)
    x = torch.randn(3, 256)
    p = "model.layers.0.self_attn.q_proj"
    t = load_file(str(tmp_path / "hand" / WEIGHTS_FILE))
    xq = torch.clamp(
        torch.round(x.double() / t[f"{p}.input_scale"].double() + t[f"{p}.input_offset"].double()), -128, 127
    )
    deq = t[f"{p}.deq_scale"].to(torch.int32).view(torch.float32).double()
    y = (xq @ t[f"{p}.weight"].double().t() + t[f"{p}.quant_bias"].double()) * deq
    torch.testing.assert_close(loaded.model.get_submodule(p)(x).double(), y, rtol=1e-5, atol=1e-5)
    # and the whole model is close to the float one (real W8A8 error, not garbage)
    with torch.no_grad():
        a, b = model(ids[:1]).logits, loaded.model(ids[:1]).logits
    assert (a - b).abs().max() < 0.2 * a.abs().max()


def test_hand_written_directory_evals_and_runs(llama, smollm2_tokenizer, text_files, tmp_path, capsys):
    model, _, _ = llama
    write_by_hand(model, smollm2_tokenizer, tmp_path / "hand", fa=True)
    assert (
        main(["eval", str(tmp_path / "hand"), "--eval", str(text_files["prose"]), "--eval-windows", "1", "--json"]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["format"] == "mindie" and result["fa_quant"] and result["ppl_quant"] > 1
    assert main(["run", str(tmp_path / "hand"), "--prompt", "The capital of France is", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("The capital of France is")


# ---------------------------------------------------------------------------------------------- corruptions


def _set_tensor(name, value):
    def edit(tensors, desc, config):
        tensors[name] = value(tensors[name]) if callable(value) else value

    return edit


def _drop_tensor(name):
    def edit(tensors, desc, config):
        del tensors[name]

    return edit


def _edit_desc(name, value):
    def edit(tensors, desc, config):
        if value is None:
            del desc[name]
        else:
            desc[name] = value

    return edit


def _edit_config(edit_fn):
    def edit(tensors, desc, config):
        edit_fn(config)

    return edit


Q = "model.layers.0.self_attn.q_proj"
A = "model.layers.1.self_attn"
K_W = "model.layers.0.self_attn.k_proj.weight"
CORRUPTIONS = {
    "missing W8A8 tensor": (_drop_tensor(f"{Q}.quant_bias"), f"lists {Q}.quant_bias.*no such tensor"),
    "missing float tensor": (
        lambda t, d, c: (t.pop("model.norm.weight"), d.pop("model.norm.weight")),
        "missing tensor model.norm.weight",
    ),
    "missing FAQuant tensor": (
        lambda t, d, c: (t.pop(f"{A}.fa_k.scale"), d.pop(f"{A}.fa_k.scale")),
        f"missing tensor {A}.fa_k.scale",
    ),
    "deq_scale as float32 in a float16 model": (
        _set_tensor(f"{Q}.deq_scale", lambda t: t.to(torch.int32).view(torch.float32)),
        f"{Q}.deq_scale is float32, expected int64",
    ),
    "deq_scale value cast instead of bits": (
        _set_tensor(f"{Q}.deq_scale", lambda t: t.to(torch.int32).view(torch.float32).to(torch.int64)),
        f"{Q}.deq_scale\\[0\\] is .*input_scale \\* weight_scale",
    ),
    "weight as float16": (_set_tensor(f"{Q}.weight", lambda t: t.half()), f"{Q}.weight is float16, expected int8"),
    "weight transposed": (
        _set_tensor(K_W, lambda t: t.t().contiguous()),
        f"{K_W} has shape \\[256, 128\\], expected \\[128, 256\\]",
    ),
    "quant_bias shape": (
        _set_tensor(f"{Q}.quant_bias", lambda t: t[:-1].clone()),
        f"{Q}.quant_bias has shape \\[255\\], expected \\[256\\]",
    ),
    "C8 scale shape": (
        _set_tensor(f"{A}.v_proj.kv_cache_scale", lambda t: t.reshape(2, 64)),
        f"{A}.v_proj.kv_cache_scale has shape \\[2, 64\\]",
    ),
    "FAQuant scale zero": (
        _set_tensor(f"{A}.fa_q.scale", lambda t: torch.zeros_like(t)),
        f"{A}.fa_q.scale .*not a positive",
    ),
    "float tensor in float32": (
        _set_tensor("model.norm.weight", lambda t: t.float()),
        "model.norm.weight is float32, expected float16",
    ),
    "described FLOAT but W8A8": (_edit_desc(f"{Q}.weight", "FLOAT"), f"{Q}.weight"),
    "undescribed tensor": (_edit_desc(f"{Q}.input_scale", None), f"{Q}.input_scale has no entry"),
    "unknown type": (_edit_desc("model.norm.weight", "INT4"), "types model.norm.weight as 'INT4'"),
    "FAQuant typed W8A8": (
        _edit_desc(f"{A}.fa_v.offset", "W8A8"),
        f"types {A}.fa_v.offset as 'W8A8'.*type it 'FAQuant'",
    ),
    "unknown tensor": (
        lambda t, d, c: (t.__setitem__("model.extra", torch.zeros(1).half()), d.__setitem__("model.extra", "FLOAT")),
        "tensor model.extra is not a parameter",
    ),
    "float bias of a W8A8 Linear misshaped": (
        lambda t, d, c: (t.__setitem__(f"{Q}.bias", torch.zeros(255).half()), d.__setitem__(f"{Q}.bias", "FLOAT")),
        f"{Q}.bias has shape \\[255\\], expected \\[256\\] \\(the float bias of a W8A8 Linear\\)",
    ),
    "kv_quant_type without kv_cache_type": (
        _edit_desc("kv_cache_type", None),
        "kv_cache_type None and kv_quant_type 'C8'",
    ),
    "config disagrees with description": (
        _edit_config(lambda c: c["quantization_config"].pop("fa_quant_type")),
        "quantization_config .* disagrees with quant_model_description.json",
    ),
    "model dtype float32": (_edit_config(lambda c: c.update(torch_dtype="float32")), "torch_dtype is 'float32'"),
    "model_quant_type": (_edit_desc("model_quant_type", "W4A16"), "model_quant_type is 'W4A16'"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corruption_is_named(exported, tmp_path, case):
    edit, message = CORRUPTIONS[case]
    d = tmp_path / "bad"
    shutil.copytree(exported, d)
    tensors = load_file(str(d / WEIGHTS_FILE))
    desc = json.loads((d / DESCRIPTION_FILE).read_text())
    config = json.loads((d / "config.json").read_text())
    edit(tensors, desc, config)
    save_file(tensors, str(d / WEIGHTS_FILE))
    (d / DESCRIPTION_FILE).write_text(json.dumps(desc))
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(QpassError, match=message):
        load_mindie(d, load_tokenizer=False)


def test_missing_file_is_named(exported, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(exported, d)
    (d / WEIGHTS_FILE).unlink()
    with pytest.raises(QpassError, match=f"no {WEIGHTS_FILE}"):
        load_mindie(d)


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_eval_and_run_on_exported_directory(exported, text_files, capsys):
    assert main(["eval", str(exported), "--eval", str(text_files["prose"]), "--eval-windows", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["format"] == "mindie" and result["w8a8_linears"] == 14 and result["kv_cache"] == "static"
    assert result == {**result, "fa_quant": True, "model_dtype": "float16"} and result["ppl_quant"] > 1
    sat = result["saturation"]  # counted with the recipe read back from the directory, which has no calibration figures
    assert (
        sat["calibration"] == {} and set(sat["measured"]["0"]) == {"q", "k", "v"} and sat["tokens"] == result["tokens"]
    )
    assert evaluate_saved(exported, text_files["prose"], 1)["ppl_quant"] == pytest.approx(result["ppl_quant"], rel=1e-9)
    assert main(["run", str(exported), "--prompt", "Hello there", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("Hello there")


def test_compile_result_saves_mindie(llama, smollm2_tokenizer, tmp_path):
    model, full, _ = llama
    recipe = variant(full, True, False)
    report = {
        "model": {"name": "tiny", "num_heads": 4, "num_kv_heads": 2, "head_dim": 64},
        "sites": [],
        "passes": {},
        "config": recipe.config.to_dict(),
        "sqnr_db": {},
        "timings_s": {},
    }
    compiled = Compiled(recipe, report, model.state_dict(), model.config.to_dict(), smollm2_tokenizer)
    result = CompileResult(
        program=None, recipe=recipe, sites=[], report=report, tokenizer=smollm2_tokenizer, compiled=compiled
    )
    out = result.save(tmp_path / "out", format="mindie", dtype="bfloat16")
    loaded = load_mindie(out)
    assert (
        loaded.info["model_dtype"] == "bfloat16" and loaded.recipe.config.fa_quant and (out / "report.json").is_file()
    )
    with pytest.raises(QpassError, match="--dtype float32"):
        result.save(tmp_path / "out2", format="mindie", dtype="float32")
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--format", "mindie", "--dtype", "bfloat16", "--kv-int8"], "bfloat16 with --kv-int8"),
        (["--fa-quant", "--dtype", "float16"], "only --format mindie / vllm-ascend have a model dtype"),
        (["--w8a8", "--kv-int8", "--format", "vllm-ascend"], "add --symmetric"),
        (["--w8a8", "--fa-quant", "--format", "vllm-ascend"], "FAKQuant"),
        (["--fa-quant", "--format", "mindie"], "add --w8a8"),
    ],
)
def test_cli_compile_format_errors(tmp_path, capsys, argv, message):
    assert main(["compile", "default", "-o", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
