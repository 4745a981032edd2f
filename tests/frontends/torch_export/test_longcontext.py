"""The long-context check's torch.export runs: the paged scorer against the dense Q/DQ program it was lowered from,
chunked prefill against one call, the float scorer against one forward, and a decoder lowered again for a context
longer than the saved one."""

import torch
import torch.nn.functional as F

from qpass.exporters.base import Loaded
from qpass.frontends.torch_export import longcontext
from qpass.frontends.torch_export.decoder import build_decoder, decoder_layout
from tests.helpers.paged_cases import recipe_for, tiny


def _close(nll, expected):
    """Within what the folded int8 attention and the Q/DQ program's float attention round apart (an int8 code now and
    then on the other side of a rounding boundary, amplified by this model's large random weights). How many codes
    flip depends on the CPU's float kernels: on an AMD EPYC the mean stayed under 1e-4, on an Intel Xeon (AVX-512)
    18 of the 95 tokens move by more than 1e-4, the largest by 2.7e-3, the mean 1.03e-4. A wrong scale, offset or
    position moves them by tenths."""
    diff = (nll - expected).abs()
    return diff.max() < 5e-3 and diff.mean() < 3e-4


def _dense_nll(program, ids):
    with torch.no_grad():
        logits = program.module()(torch.tensor([ids]), torch.arange(len(ids))[None])[0, :-1]
    return F.cross_entropy(logits.float(), torch.tensor(ids[1:]), reduction="none").double()


def test_paged_scores_are_the_dense_quantized_programs_whatever_the_chunks(monkeypatch):
    model = tiny("llama")
    recipe = recipe_for(model, "both")
    reference, lowered = build_decoder(model, recipe, max_context=96)
    ids = torch.randint(0, 256, (96,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = _dense_nll(reference, ids)
    for chunk in (96, 24):
        monkeypatch.setattr(longcontext, "PREFILL_CHUNK", chunk)
        nll, hit = longcontext.paged_scores(lowered, ids, 80)
        assert _close(nll, expected) and hit.dtype == torch.bool and nll.shape == (95,)


def test_float_scores_on_the_models_cache_are_one_forwards(monkeypatch):
    model = tiny("llama")
    ids = torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    expected = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").double()
    monkeypatch.setattr(longcontext, "PREFILL_CHUNK", 16)
    nll, hit = longcontext.float_scores(model, ids)
    assert (nll - expected).abs().max() < 1e-4
    assert torch.equal(hit, logits.argmax(-1) == torch.tensor(ids[1:]))


def test_a_context_beyond_the_saved_decoder_is_lowered_again_from_the_recipe():
    model = tiny("llama")
    recipe = recipe_for(model, "kv-int8")
    _, saved = build_decoder(model, recipe, max_context=64)
    loaded = Loaded("qpass", None, recipe, decoder=saved)
    program, how = longcontext.paged_decoder(loaded, 64, model)
    assert program is saved and how == "the saved decoder.pt2"
    program, how = longcontext.paged_decoder(loaded, 128, model)
    assert decoder_layout(program)["max_context"] == 128 and "lowered again" in how
    ids = torch.randint(0, 256, (128,), generator=torch.Generator().manual_seed(3)).tolist()
    reference, _ = build_decoder(model, recipe, max_context=128)
    nll, _ = longcontext.paged_scores(program, ids, 100)
    assert _close(nll, _dense_nll(reference, ids))
