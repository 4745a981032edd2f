"""The torch.export frontend's pass pipeline (qpass/frontends/torch_export/pipeline.py): the Q/DQ passes together,
and the program they give saved and loaded."""

import pytest
import torch

from qpass.frontends.torch_export.pipeline import quantize_program
from qpass.models.tiny import tiny_model
from tests.helpers.frontend_cases import calibrated

WINDOW = 32


def _setup(arch, **config):
    ids = torch.randint(0, 256, (8, WINDOW))
    fe, recipe = calibrated(tiny_model(arch, num_layers=2), ids, **config)
    return fe.program, fe.attention_sites(), recipe, ids


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
