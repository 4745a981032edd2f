"""The FAQuant and C8 Q/DQ passes: where they insert (structure), what they change (numbers), negatives."""

import pytest
import torch

from qpass.core.calibrate import attention_qparams
from qpass.core.config import QuantConfig
from qpass.core.errors import QpassError
from qpass.core.int8 import fake_quant_dynamic
from qpass.core.recipe import Recipe, geometry
from qpass.frontends.torch_export.pipeline import quantize_program
from qpass.frontends.torch_export.program import graph_copy
from qpass.models.tiny import tiny_model
from qpass.passes.fx.insert_faquant_qdq import InsertFAQuantQDQPass
from qpass.passes.fx.insert_kv_cache_qdq import InsertKVCacheQDQPass
from qpass.passes.fx.qdq import DEQUANTIZE, FAKE_QUANT_DYNAMIC, QUANTIZE
from qpass.passes.fx.verify import VerificationError, verify_graph
from tests.helpers.frontend_cases import calibrated

WINDOW = 32


def _setup(arch, **config):
    ids = torch.randint(0, 256, (8, WINDOW))
    fe, recipe = calibrated(tiny_model(arch, num_layers=2), ids, **config)
    return fe.program, fe.attention_sites(), recipe, ids


def _quantize_inputs(program):
    """{name of quantized value: scale shape} for every Quantize in the program."""
    constants = {**program.constants, **program.state_dict}
    spec = program.graph_signature.inputs_to_lifted_tensor_constants
    out = {}
    for node in program.graph.nodes:
        if node.target is QUANTIZE:
            out[node.args[0].name] = tuple(constants[spec[node.args[1].name]].shape)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_faquant_quantizes_q_k_v_per_head_and_dim(arch):
    program, sites, recipe, _ = _setup(arch, fa_quant=True)
    quantized, counts = quantize_program(program, sites, recipe)
    assert counts == {"InsertFAQuantQDQPass": 6}
    inputs = _quantize_inputs(quantized)
    for s in sites:
        assert inputs[s.q] == (s.num_heads, 1, s.head_dim)
        assert inputs[s.k] == inputs[s.v] == (s.num_kv_heads, 1, s.head_dim)
    assert len(inputs) == 6
    assert program.graph.find_nodes(op="call_function", target=QUANTIZE) == []  # input untouched


def test_c8_quantizes_k_and_v_before_the_gqa_repeat():
    program, sites, recipe, _ = _setup("llama", kv_cache="static")
    quantized, counts = quantize_program(program, sites, recipe)
    assert counts == {"InsertKVCacheQDQPass": 4}
    inputs = _quantize_inputs(quantized)
    assert set(inputs) == {n for s in sites for n in (s.k, s.v)}
    assert all(shape == (2, 1, 16) for shape in inputs.values())  # kv_heads 2, not the 4 query heads
    assert recipe.get(0, "kv_k")[0].shape == (2 * 16,)  # stored per channel [kv_heads * head_dim]


def test_both_modes_read_the_cache_then_quantize_for_attention():
    program, sites, recipe, _ = _setup("llama", fa_quant=True, kv_cache="static")
    quantized, counts = quantize_program(program, sites, recipe)
    assert counts == {"InsertFAQuantQDQPass": 6, "InsertKVCacheQDQPass": 4}
    nodes = {n.name: n for n in quantized.graph.nodes}
    k = nodes[sites[0].k]
    (c8_q,) = k.users  # the cache write comes first
    (c8_dq,) = c8_q.users
    (fa_q,) = c8_dq.users  # then FAQuant's quantize of what attention reads
    assert c8_dq.target is DEQUANTIZE and fa_q.target is QUANTIZE


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_quantized_program_stays_close_to_float_and_saves(arch, tmp_path):
    program, sites, recipe, ids = _setup(arch, fa_quant=True, kv_cache="static")
    quantized, _ = quantize_program(program, sites, recipe)
    with torch.no_grad():
        ref = program.module()(ids[:2])
        out = quantized.module()(ids[:2])
    assert not torch.equal(ref, out)  # the Q/DQ pairs really run
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum())
    assert sqnr > 25, f"logits SQNR {sqnr:.1f} dB"
    torch.export.save(quantized, str(tmp_path / "p.pt2"))
    loaded = torch.export.load(str(tmp_path / "p.pt2"))
    with torch.no_grad():
        assert torch.equal(loaded.module()(ids[:2]), out)


def test_pass_reports_no_change_without_sites():
    program, sites, recipe, _ = _setup("llama", fa_quant=True)
    gm = graph_copy(program)
    result = InsertFAQuantQDQPass([], recipe)(gm)
    assert result.modified is False
    passes = InsertFAQuantQDQPass(sites, recipe)
    result = passes(gm)
    assert result.modified is True and passes.count == 6
    verify_graph(result.graph_module)


def test_recipe_without_the_needed_tensors_is_refused():
    program, sites, recipe, _ = _setup("llama", fa_quant=True)
    with pytest.raises(QpassError, match="kv_k"):
        InsertKVCacheQDQPass(sites, recipe)(graph_copy(program))


def test_verifier_catches_a_quantize_without_dequantize():
    program, sites, recipe, _ = _setup("llama", kv_cache="static")
    gm = graph_copy(program)
    InsertKVCacheQDQPass(sites, recipe)(gm)
    dq = next(n for n in gm.graph.nodes if n.target is DEQUANTIZE)
    dq.replace_all_uses_with(dq.args[0].args[0])  # bypass the dequantize: int8 now unused
    gm.graph.erase_node(dq)
    with pytest.raises(VerificationError, match="not read back"):
        verify_graph(gm)



def _attention_with_dynamic_kv(module, query, key, value, *args, **kwargs):
    """Hugging Face's SDPA attention with K and V (after RoPE, before GQA's repeat) through the dynamic formula."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, fake_quant_dynamic(key), fake_quant_dynamic(value), *args, **kwargs)


def test_dynamic_cache_fake_quantizes_k_and_v_per_token_and_head_without_recipe_tensors():
    from transformers import AttentionInterface

    model = tiny_model("llama", num_layers=2)
    ids = torch.randint(0, 256, (4, WINDOW))
    fe, recipe = calibrated(model, ids, kv_cache="dynamic")
    assert dict(recipe.tensors) == {}  # nothing to calibrate
    sites = fe.attention_sites()
    quantized, counts = quantize_program(fe.program, sites, recipe)
    assert counts == {"InsertKVCacheQDQPass": 4}
    nodes = quantized.graph.find_nodes(op="call_function", target=FAKE_QUANT_DYNAMIC)
    assert sorted(n.args[0].name for n in nodes) == sorted(n for s in sites for n in (s.k, s.v))  # before GQA's repeat
    assert not quantized.graph.find_nodes(op="call_function", target=QUANTIZE)
    with torch.no_grad():
        out = quantized.module()(ids[:2])
        float_logits = fe.program.module()(ids[:2])
        AttentionInterface.register("qpass_test_dynamic_kv", _attention_with_dynamic_kv)
        model.set_attn_implementation("qpass_test_dynamic_kv")
        expected = model(ids[:2]).logits  # the eager model, the formula applied where the cache stores K and V
    assert not torch.equal(out, float_logits)
    assert (out - expected).abs().max().item() < 1e-4


def test_dynamic_cache_is_what_the_sweep_tool_builds_and_goes_with_w8a8():
    """``QuantConfig(kv_cache="dynamic")`` through ``attention_qparams`` and ``frontend.logits(recipe)`` (as
    tools/sweep_observers.py builds its recipes), and calibrated with W8A8, whose Linears it keeps."""
    ids = torch.randint(0, 256, (8, WINDOW))
    fe, w8a8 = calibrated(tiny_model("llama", num_layers=2), ids, kv_cache="dynamic", w8a8=True)
    sites = fe.attention_sites()
    assert set(w8a8.tensors) == {k for k in w8a8.tensors if k.startswith("w8a8.")} and w8a8.w8a8_linears()
    config = QuantConfig(kv_cache="dynamic", window=WINDOW)
    recipe = Recipe(config, geometry(sites), *attention_qparams(sites, {}, config))
    with torch.no_grad():
        ref, out = fe.logits()(ids[:2]), fe.logits(recipe)(ids[:2])
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum())
    assert 30 < sqnr < float("inf"), f"logits SQNR {sqnr:.1f} dB"
    _, counts = quantize_program(fe.program, sites, w8a8)
    assert counts["InsertKVCacheQDQPass"] == 4 and counts["InsertW8A8Pass"] == len(w8a8.w8a8_linears())


def test_verifier_catches_a_dynamic_fake_quant_that_changes_the_dtype():
    program, sites, recipe, _ = _setup("llama", kv_cache="dynamic")
    gm = graph_copy(program)
    InsertKVCacheQDQPass(sites, recipe)(gm)
    verify_graph(gm)
    node = gm.graph.find_nodes(op="call_function", target=FAKE_QUANT_DYNAMIC)[0]
    node.meta["val"] = node.meta["val"].to(torch.float16)
    with pytest.raises(VerificationError, match="dynamic fake quant"):
        verify_graph(gm)
