"""End to end on the real SmolLM2-135M (GQA 9/3 heads, RoPE): sites, capture fidelity, accuracy, and greedy decoding on
the paged int8 cache."""

import pytest

import qpass
from qpass.core import corpus
from qpass.core.config import QuantConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return qpass.load_model("default")


def test_all_thirty_sites_found_by_structure(smollm2):
    sites = qpass.inspect_model(smollm2)
    assert len(sites) == 30
    assert {(s.form, s.num_heads, s.num_kv_heads, s.head_dim, s.rope, s.qk_norm) for s in sites} == {
        ("sdpa", 9, 3, 64, True, False)
    }
    assert [s.k_from for s in sites[:2]] == [f"model.layers.{i}.self_attn.k_proj.weight" for i in (0, 1)]


@pytest.mark.parametrize("mode,limit_pct", [("kv", 0.2), ("fa", 0.4)])
def test_compile_matches_the_model_and_stays_within_target(smollm2, mode, limit_pct, tmp_path):
    config = QuantConfig(fa_quant=mode == "fa", kv_cache="static" if mode == "kv" else None)
    eval_path = tmp_path / "eval.txt"
    eval_path.write_text(corpus.eval_code(), encoding="utf-8")
    run = qpass.RunSettings(window=256, calib_samples=16, eval_windows=8)
    result = qpass.compile(smollm2, config, calib=corpus.calibration_samples(), eval=eval_path, run=run)
    ev = result.report["eval"]
    assert abs(ev["ppl_float"] / ev["ppl_reference"] - 1) * 100 <= 0.01
    # the target is an increase; 2,048 tokens of evaluation move perplexity by about 0.2% either way (measured:
    # extreme C8 -0.20%, mse FAQuant -0.29%), so a decrease is held only to twice the target
    assert -2 * limit_pct <= ev["ppl_increase_pct"] <= limit_pct, ev
    sqnr = result.report["sqnr_db"]
    assert min(sqnr[str(layer)]["k"] for layer in range(30)) > 30


def test_paged_int8_decoder_gives_the_reference_greedy_tokens(smollm2):
    from qpass.frontends.torch_export.decoder import build_decoder, generate_lowered, generate_reference
    from tests.helpers.frontend_cases import calibrated

    text = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. " * 8
    ids = smollm2.tokenizer(text, return_tensors="pt").input_ids[:, :128].reshape(2, 64)
    _, recipe = calibrated(smollm2.model, ids, kv_cache="static", observer="minmax", batch_size=2)
    reference, lowered = build_decoder(smollm2.model, recipe, max_context=256)
    prompt = smollm2.tokenizer("def fibonacci(n):")["input_ids"]
    assert generate_lowered(lowered, prompt, 8) == generate_reference(reference, prompt, 8)
