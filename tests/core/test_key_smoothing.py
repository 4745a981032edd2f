"""The dynamic cache's key smoothing: K's channels divided by their calibrated reach, Q's multiplied, folded into the
q and k projections (:mod:`qpass.core.smoothing`, :func:`qpass.core.calibrate.key_smoothing_sites`)."""

import dataclasses

import pytest
import torch

from qpass.core.calibrate import calibrate
from qpass.core.config import QuantConfig
from qpass.core.errors import QpassError
from qpass.core.int8 import fake_quant_dynamic
from qpass.core.observers import Observer
from qpass.core.recipe import Recipe, key_smooth_key
from qpass.core.smoothing import KEY_ALPHAS, KEY_SCALE_LIMIT, apply_smoothing, key_smoothing_scale
from qpass.frontends.torch_export.frontend import set_parameters
from qpass.models.tiny import tiny_model
from tests.helpers.frontend_cases import frontend

WINDOW = 32
DYNAMIC = QuantConfig(kv_cache="dynamic")


def _outlying(model: torch.nn.Module) -> torch.nn.Module:
    """K with one channel of each kv head 25 times its other channels in every layer, as real LLMs' keys have a few
    far beyond the rest."""
    with torch.no_grad():
        for layer in model.model.layers:
            k = layer.self_attn.k_proj
            head_dim = k.out_features // model.config.num_key_value_heads
            for h in range(model.config.num_key_value_heads):
                k.weight[h * head_dim + 1] *= 25.0  # channel 1, whose RoPE partner is head_dim / 2 + 1
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])  # qwen2: q and k with biases; all GQA with RoPE
def test_key_smoothing_keeps_the_float_function_and_errs_less_where_it_is_chosen(arch):
    model = _outlying(tiny_model(arch, num_layers=2))
    fe = frontend(model, WINDOW)
    ids = torch.randint(0, 256, (4, WINDOW), generator=torch.Generator().manual_seed(0))  # 128 tokens: all kept
    recipe = calibrate(fe, ids, DYNAMIC, 2)
    sites = fe.attention_sites()
    alphas = {int(layer): a for layer, a in recipe.stats["key_smoothing"].items()}
    assert sorted(alphas) == [s.layer for s in sites] and set(alphas.values()) <= set(KEY_ALPHAS)
    chosen = [s for s in sites if alphas[s.layer] > 0]
    assert chosen and sorted(recipe.tensors) == sorted(key_smooth_key(s.layer) for s in chosen)
    assert [g["prev_kind"] for g in recipe.smoothing] == ["key"] * len(chosen)

    reference = fe.logits()(ids)
    smoothed = apply_smoothing(fe.state_dict(), recipe.smoothing, recipe.tensors)
    gm = fe.program.module()
    set_parameters(gm, smoothed)
    torch.testing.assert_close(gm(ids), reference, rtol=1e-4, atol=1e-4)  # every score kept: RoPE pairs, GQA groups

    for site in chosen:  # the folded weights give the improvement the search saw: K evener, scores nearer
        head_dim, group = site.head_dim, site.num_heads // site.num_kv_heads
        seen = {}
        for label, params in (("plain", None), ("smoothed", smoothed)):
            seen[label] = {site.q: Observer(max_tokens=10**6), site.k: Observer(max_tokens=10**6)}
            fe.observe(ids, seen[label], 2, state_dict=params)
        spread, errors = {}, {}
        for label, (q_obs, k_obs) in ((label, (o[site.q], o[site.k])) for label, o in seen.items()):
            reach = k_obs.absmax.reshape(-1, head_dim)
            spread[label] = reach.amax(1) / reach.median(1).values
            q = q_obs.sample().reshape(-1, site.num_kv_heads, group, head_dim)
            k = k_obs.sample().reshape(-1, site.num_kv_heads, head_dim)
            errors[label] = torch.einsum("thgd,shd->hgts", q, fake_quant_dynamic(k) - k).pow(2).mean()
        assert (spread["plain"] > 8).all() and (spread["smoothed"] < spread["plain"] / 3).all()
        assert errors["smoothed"] < 0.9 * errors["plain"]


def _observed(k: torch.Tensor, q: torch.Tensor, pairs=None) -> tuple[Observer, Observer]:
    k_obs, q_obs = Observer(pairs=pairs), Observer()
    k_obs.update(k)
    q_obs.update(q)
    return k_obs, q_obs


def test_the_scale_gives_a_rope_pair_one_scale_and_each_head_a_geometric_mean_of_one():
    head_dim, turned = 8, 3  # partial rotary: channels 0-2 turn with 3-5, 6 and 7 do not
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, 2 * head_dim, generator=gen)
    x[:, 1] *= 40.0  # a large rotated channel of head 0: its partner 4 gets its scale
    x[:, head_dim + 7] *= 10.0  # an unrotated channel of head 1: its own scale
    x[:, head_dim + 6] = 0.0  # a channel that never moved: the head's mean, 1
    q = torch.randn(200, 2 * head_dim, generator=gen)  # one q head per kv head
    s, alpha = key_smoothing_scale(*_observed(x, q, (head_dim, turned)), head_dim, 1)
    assert alpha > 0
    s = s.reshape(2, head_dim).double()
    assert torch.equal(s[:, :turned], s[:, turned : 2 * turned])
    assert s[1, 6] == 1.0 and s[0, 1] == s[0].max() and s[1, 7] == s[1].max()
    kept = torch.ones(2, head_dim, dtype=torch.bool)
    kept[1, 6] = False
    for h in range(2):
        assert s[h][kept[h]].log().mean().exp().item() == pytest.approx(1.0, rel=1e-6)
    reach = torch.hypot(x[:, 1], x[:, 4]).max() / torch.hypot(x[:, 0], x[:, 3]).max()
    assert s[0, 1] / s[0, 0] == pytest.approx(float(reach) ** alpha, rel=1e-5)

    wild_k, wild_q = torch.tensor([[1e-30, 1.0, 1e30, 1.0]]), torch.ones(1, 4)
    s, _ = key_smoothing_scale(*_observed(wild_k, wild_q), 4, 1)
    assert torch.isfinite(s).all() and s.min() >= 1 / KEY_SCALE_LIMIT and s.max() <= KEY_SCALE_LIMIT


def test_the_search_smooths_less_where_q_reads_the_large_channel_and_not_at_all_on_a_tie():
    """Smoothing enlarges Q where it shrinks K, so the error moves onto the channels Q reads there: with Q spread over
    every channel the search smooths further than with Q reading K's large channel alone; K whose channels reach
    alike gains nothing, and keeps scale 1."""
    gen = torch.Generator().manual_seed(2)
    k = torch.randn(256, 16, generator=gen)
    k[:, 3] *= 30.0
    spread_q = torch.randn(256, 16, generator=gen)
    only_large = torch.zeros(256, 16)
    only_large[:, 3] = torch.randn(256, generator=gen)
    spread = key_smoothing_scale(*_observed(k, spread_q), 16, 1)[1]
    only = key_smoothing_scale(*_observed(k, only_large), 16, 1)[1]
    assert 0 < spread < 1 and only < spread
    even = torch.randint(0, 2, (256, 16), generator=gen).float() * 2 - 1  # every channel reaches 1
    scale, alpha = key_smoothing_scale(*_observed(even, spread_q), 16, 1)
    assert alpha == 0 and torch.equal(scale, torch.ones(16))


@pytest.mark.parametrize(
    "arch, why",
    [("gemma3", "q and k are normed per head after their projections"), ("gpt2", "q and k do not come from Linears")],
)
def test_sites_it_cannot_fold_into_are_left_alone_and_say_why(arch, why):
    fe = frontend(tiny_model(arch, num_layers=2), WINDOW)
    recipe = calibrate(fe, torch.randint(0, 256, (4, WINDOW)), DYNAMIC, 2)
    assert dict(recipe.tensors) == {} and recipe.smoothing == []
    assert all(reason.startswith(why) for reason in recipe.stats["key_smoothing"].values())


def test_a_recipe_with_key_smoothing_where_it_cannot_apply_is_refused(tmp_path):
    fe = frontend(_outlying(tiny_model("qwen2", num_layers=2)), WINDOW)
    recipe = calibrate(fe, torch.randint(0, 256, (4, WINDOW), generator=torch.Generator().manual_seed(0)), DYNAMIC, 2)
    assert key_smooth_key(0) in recipe.tensors
    recipe.save(tmp_path / "ok")
    assert Recipe.load(tmp_path / "ok").smoothing == recipe.smoothing
    static = recipe.replace(config=QuantConfig(kv_cache="static"))
    static = static.replace(
        tensors={**static.tensors, **calibrate(fe, torch.randint(0, 256, (4, WINDOW)), static.config).tensors}
    )
    static.save(tmp_path / "static")
    with pytest.raises(QpassError, match=r"key smoothing \(layer 0\), which only a recipe of the dynamic cache has"):
        Recipe.load(tmp_path / "static")
    unnamed = recipe.replace(sites=[dataclasses.replace(s, projections=("", "", "")) for s in recipe.sites])
    unnamed.save(tmp_path / "unnamed")
    with pytest.raises(QpassError, match="key smoothing for layer 0, whose q and k projections recipe.json does not"):
        Recipe.load(tmp_path / "unnamed")


def test_the_vllm_directory_carries_the_folded_weights_and_reads_back_what_the_compile_measured(
    smollm2_tokenizer, text_files, tmp_path, capsys
):
    """``--kv-int8 dynamic --format vllm`` of a model whose K has outlying channels: the q and k projections written
    are the float ones with the key smoothing folded in (vLLM loads them as they are), and the directory, read back,
    measures the perplexity the compile measured."""
    import json

    from safetensors.torch import load_file

    from qpass.cli import main
    from tests.helpers.paged_cases import tiny

    model = _outlying(tiny("llama", vocab_size=len(smollm2_tokenizer)))
    model.config.max_position_embeddings = 1024
    model.save_pretrained(tmp_path / "model", safe_serialization=True)
    smollm2_tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    args = ["compile", str(tmp_path / "model"), "--kv-int8", "dynamic", "--format", "vllm", "-o", str(out)]
    small = ["--calib", str(text_files["calib"]), "--calib-samples", "4", "--batch-size", "2"]
    assert main([*args, *small, "--eval", str(text_files["prose"]), "--eval-windows", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    chosen = [layer for layer, alpha in report["key_smoothing"].items() if alpha > 0]
    assert chosen, report["key_smoothing"]

    written, original = load_file(str(out / "model.safetensors")), model.state_dict()
    for layer in chosen:
        attention = f"model.layers.{layer}.self_attn"
        for proj in ("q_proj", "k_proj"):
            assert not torch.allclose(
                written[f"{attention}.{proj}.weight"].float(), original[f"{attention}.{proj}.weight"]
            )
        q = written[f"{attention}.q_proj.weight"].double().reshape(4, 64, -1)
        k = written[f"{attention}.k_proj.weight"].double().reshape(2, 64, -1)
        q0 = original[f"{attention}.q_proj.weight"].double().reshape(4, 64, -1)
        k0 = original[f"{attention}.k_proj.weight"].double().reshape(2, 64, -1)
        torch.testing.assert_close(  # every head's q . k weights unchanged (q heads 2h, 2h + 1 read kv head h)
            torch.einsum("hdi,hdj->hij", q, k.repeat_interleave(2, 0)),
            torch.einsum("hdi,hdj->hij", q0, k0.repeat_interleave(2, 0)),
            rtol=1e-4,
            atol=1e-6,
        )
    capsys.readouterr()
    read = ["eval", str(out), "--eval", str(text_files["prose"]), "--eval-windows", "2", "--no-float", "--json"]
    assert main(read) == 0
    assert json.loads(capsys.readouterr().out)["ppl_quant"] == pytest.approx(report["eval"]["ppl_quant"], rel=1e-6)
