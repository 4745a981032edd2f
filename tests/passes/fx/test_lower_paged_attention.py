"""Lowering attention to the paged int8 ops: structure, numbers, greedy token-for-token match, negatives, CLI."""

import shutil

import pytest
import torch

from qpass.cli import main
from qpass.core.errors import QpassError
from qpass.frontends.torch_export.capture import param_names
from qpass.frontends.torch_export.decoder import (
    build_decoder,
    capture_decoder,
    decoder_layout,
    generate_lowered,
    generate_reference,
)
from qpass.frontends.torch_export.pipeline import lower_program, quantize_program
from qpass.models.tiny import tiny_model
from qpass.passes.fx.find_attention_sites import find_attention_sites
from qpass.passes.fx.fuse_quantized_attention import INT8_KV_ATTENTION, verify_fused
from qpass.passes.fx.lower_paged_attention import CACHE_WRITE, PAGED_ATTENTION, LowerPagedAttentionPass
from qpass.passes.fx.patterns import FUSED_ATTENTION, SOFTMAX
from qpass.passes.fx.qdq import QUANTIZE
from tests.helpers.paged_cases import fused_decoder, prefill, recipe_for, tiny

# per layer: Q's pair stays; with both, C8's round trip on K, V
QUANTIZE_LEFT = {"kv-int8": 0, "fa-quant": 1, "both": 3}
CASES = [
    ("llama", "kv-int8"),
    ("llama", "fa-quant"),
    ("qwen2", "kv-int8"),
    ("qwen2", "both"),
    ("gpt2", "kv-int8"),
    ("gpt2", "fa-quant"),
]
NEW_TOKENS = 12


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these models are tiny, and with other test processes on the same two cores,
    OpenMP's spinning worker threads make each small matmul up to 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def decoder(request):
    arch, mode = request.param
    torch.manual_seed(0)
    model = tiny(arch)
    reference, lowered = build_decoder(model, recipe_for(model, mode), max_context=128)
    return arch, mode, reference, lowered


def test_structure(decoder):
    arch, mode, _, lowered = decoder
    graph = lowered.graph
    assert not [n for n in graph.nodes if n.target in FUSED_ATTENTION or n.target in SOFTMAX]
    writes = [n for n in graph.nodes if n.target is CACHE_WRITE]
    reads = [n for n in graph.nodes if n.target is PAGED_ATTENTION]
    assert len(writes) == len(reads) == 2
    assert sum(n.target is QUANTIZE for n in graph.nodes) == 2 * QUANTIZE_LEFT[mode]
    inputs = list(lowered.graph_signature.user_inputs)
    assert inputs == [
        "input_ids",
        "position_ids",
        "key_cache_0",
        "value_cache_0",
        "key_cache_1",
        "value_cache_1",
        "block_tables",
        "context_lens",
        "slot_mapping",
        "query_start_loc",
    ]
    for layer, (write, read) in enumerate(zip(writes, reads)):
        # each layer writes its own caches (program inputs) and reads them back
        assert [a.name for a in write.args[2:4]] == [f"key_cache_{layer}", f"value_cache_{layer}"]
        assert read.args[1:3] == write.args[2:4]
    kv_heads = 4 if arch == "gpt2" else 2
    assert decoder_layout(lowered) == {
        "num_layers": 2,
        "block_size": 16,
        "num_kv_heads": kv_heads,
        "head_dim": 64,
        "max_context": 128,
        "kv_cache": "static",
    }


@pytest.mark.parametrize("mode", ["kv-int8", "fa-quant", "both"])
def test_lowering_goes_through_the_generic_op_first(mode):
    """Stage 1 leaves one int8_kv_attention per site and no attention spelling, computing what the Q/DQ
    program computes; stage 2 alone turns each into a cache write and a paged attention."""
    model = tiny("llama", num_layers=2)
    reference, _ = build_decoder(model, recipe_for(model, mode), max_context=128)
    gm = fused_decoder(reference, INT8_KV_ATTENTION)
    verify_fused(gm)
    assert not [n for n in gm.graph.nodes if n.target in FUSED_ATTENTION or n.target in SOFTMAX]
    lower = LowerPagedAttentionPass()
    assert lower(gm).modified and lower.count == 2
    assert len(gm.graph.find_nodes(op="call_function", target=CACHE_WRITE)) == 2
    assert not gm.graph.find_nodes(op="call_function", target=INT8_KV_ATTENTION)
    assert LowerPagedAttentionPass()(gm).modified is False  # nothing left to lower


def test_greedy_tokens_match_unlowered_program(decoder):
    """Greedy decoding on the paged int8 cache gives the reference's tokens, except that from a step where the
    reference's best two logits are closer than the two-layer tolerance (1% of the logits' range: a K/V code a step
    apart, below) the two may part ways: a random model's logits are flat, and such ties come and go with
    transformers' initialisation. At least half the tokens must agree before any such tie."""
    _, _, reference, lowered = decoder
    prompt = torch.randint(0, 256, (8,), generator=torch.Generator().manual_seed(1))
    expected = generate_reference(reference, prompt, NEW_TOKENS)
    assert len(set(expected)) > 3  # a varied continuation, so that matching it means something
    got = generate_lowered(lowered, prompt, NEW_TOKENS)
    parted = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
    if parted is not None:
        ids = prompt.tolist() + expected[:parted]
        with torch.no_grad():
            logits = reference.module()(torch.tensor([ids]), torch.arange(len(ids))[None])[0, -1]
        gap = float(logits[expected[parted]] - logits[got[parted]])
        assert parted >= NEW_TOKENS // 2 and gap < 0.01 * float(logits.max() - logits.min()), (parted, gap)


@pytest.mark.parametrize("mode", ["kv-int8", "both"])
def test_prefill_logits_of_one_layer_match(mode):
    """One layer: the cache holds exactly the codes of the reference's Q/DQ, so only the float order of
    the attention sums differs (the folded paged op vs SDPA): logits agree to 1e-4."""
    model = tiny("llama", num_layers=1)
    reference, lowered = build_decoder(model, recipe_for(model, mode), max_context=128)
    ids = torch.randint(0, 256, (1, 37))
    with torch.no_grad():
        expected = reference.module()(ids, torch.arange(37)[None])
    logits, _ = prefill(lowered, ids)
    assert (logits - expected).abs().max().item() < 1e-4


def test_prefill_logits_of_two_layers_are_close(decoder):
    """Two layers: a 1e-7 difference in layer 0's output can move a later K/V code by one step (seen: 1e-5
    without such a flip, 5e-3 with one, on logits of about 6), so the tolerance is 1% of the logits' range;
    a wrong cache, scale or mask gives errors of order 1."""
    _, _, reference, lowered = decoder
    ids = torch.randint(0, 256, (1, 37))
    with torch.no_grad():
        expected = reference.module()(ids, torch.arange(37)[None])
    logits, caches = prefill(lowered, ids)
    assert (logits - expected).abs().max().item() < 0.01 * expected.abs().max().item()
    assert all(bool(c[:3].any()) for pair in caches for c in pair)  # the 37 tokens were written (3 blocks of 16)


def test_sliding_window_is_refused_unless_the_context_fits_in_it():
    model = tiny("mistral")  # sliding_window=8
    recipe = recipe_for(model, "kv-int8")
    with pytest.raises(QpassError, match=r"layer 0\).*not the causal mask.*sliding window"):
        build_decoder(model, recipe, max_context=64)
    reference, lowered = build_decoder(model, recipe, max_context=8)  # within the window: plain causal
    prompt = [3, 1, 4, 1, 5]
    assert generate_lowered(lowered, prompt, 3) == generate_reference(reference, prompt, 3)
    with pytest.raises(QpassError, match="exceed the 8 tokens"):
        generate_lowered(lowered, prompt, 4)


def test_program_without_qdq_is_refused():
    program = capture_decoder(tiny("llama"), max_context=64)
    with pytest.raises(QpassError, match=r"layer 0\): its K has no Quantize/Dequantize.*--kv-int8 or --fa-quant"):
        lower_program(program, max_context=64)


class NoAttentionDecoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(256, 32)
        self.head = torch.nn.Linear(32, 256)

    def forward(self, input_ids, position_ids):
        return self.head(self.embed(input_ids) + position_ids[..., None])


def test_program_without_attention_is_refused():
    program = torch.export.export(NoAttentionDecoder(), (torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None]))
    with pytest.raises(QpassError, match="no attention found"):
        lower_program(program)


def test_unsupported_head_dim_is_refused():
    model = tiny_model("llama")  # head_dim 16
    program = capture_decoder(model, max_context=64)
    sites = find_attention_sites(program.graph, param_names(program))
    quantized, _ = quantize_program(program, sites, recipe_for(model, "kv-int8"))
    message = r"head_dim=16 is not supported by the paged ops \(supported: \(64, 128, 256\)\)"
    with pytest.raises(QpassError, match=message):
        lower_program(quantized, max_context=64)


@pytest.fixture(scope="module")
def compiled_dir(tmp_path_factory, smollm2_tokenizer):
    """``qpass compile --kv-int8`` of a tiny Llama with SmolLM2's vocabulary, saved with its tokenizer."""
    import qpass
    from qpass.models.loaders import LoadedModel

    torch.manual_seed(0)
    model = tiny("llama", vocab_size=len(smollm2_tokenizer))
    config = qpass.QuantConfig(kv_cache="static", observer="minmax")
    texts = ["The quick brown fox jumps over the lazy dog, again and again, until the dog wakes up. " * 4]
    result = qpass.compile(
        LoadedModel(model, smollm2_tokenizer, "tiny", "tiny-llama"),
        config,
        calib=texts,
        run=qpass.RunSettings(window=32, calib_samples=2),
    )
    out = tmp_path_factory.mktemp("compiled") / "out"
    result.save(out)
    return out, result


def test_cli_run_generates_with_the_saved_decoder(compiled_dir, smollm2_tokenizer, capsys):
    out, result = compiled_dir
    assert (out / "decoder.pt2").is_file()
    assert result.report["decoder"] == {
        "file": "decoder.pt2",
        "num_layers": 2,
        "block_size": 16,
        "num_kv_heads": 2,
        "head_dim": 64,
        "max_context": 512,
        "kv_cache": "static",
    }
    assert main(["run", str(out), "--prompt", "Once upon a time", "--max-new-tokens", "6"]) == 0
    stdout, stderr = capsys.readouterr()
    prompt = smollm2_tokenizer("Once upon a time")["input_ids"]
    new = generate_lowered(result.decoder, prompt, 6, eos_token_id=smollm2_tokenizer.eos_token_id)
    assert stdout.strip() == smollm2_tokenizer.decode(prompt + new, skip_special_tokens=True).strip()
    assert "tokens/s" in stderr


def test_cli_run_without_decoder_is_one_line_exit_2(compiled_dir, tmp_path, capsys):
    assert main(["run", str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a directory written by `qpass compile -o`" in err
    out, _ = compiled_dir
    without = tmp_path / "without"
    shutil.copytree(out, without, ignore=shutil.ignore_patterns("decoder.pt2"))
    assert main(["run", str(without), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no decoder.pt2" in err


def test_compile_skips_the_decoder_for_unsupported_head_dim():
    from qpass.frontends.torch_export.decoder import compile_decoder

    model = tiny_model("llama")  # head_dim 16
    decoder, info = compile_decoder(model, recipe_for(model, "kv-int8"))
    assert decoder is None and "head_dim=16" in info["skipped"]
