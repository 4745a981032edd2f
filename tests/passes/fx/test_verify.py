"""The torch.fx graph checks run after every pass (qpass/passes/fx/verify.py): each catches the broken graph it
names."""

import pytest
import torch

from qpass.frontends.torch_export.program import graph_copy
from qpass.models.tiny import tiny_model
from qpass.passes.fx.insert_kv_cache_qdq import InsertKVCacheQDQPass
from qpass.passes.fx.qdq import DEQUANTIZE, FAKE_QUANT_DYNAMIC
from qpass.passes.fx.verify import VerificationError, verify_graph
from tests.helpers.frontend_cases import calibrated

WINDOW = 32


def _setup(arch, **config):
    ids = torch.randint(0, 256, (8, WINDOW))
    fe, recipe = calibrated(tiny_model(arch, num_layers=2), ids, **config)
    return fe.program, fe.attention_sites(), recipe, ids


def test_verifier_catches_a_quantize_without_dequantize():
    program, sites, recipe, _ = _setup("llama", kv_cache="static")
    gm = graph_copy(program)
    InsertKVCacheQDQPass(sites, recipe)(gm)
    dq = next(n for n in gm.graph.nodes if n.target is DEQUANTIZE)
    dq.replace_all_uses_with(dq.args[0].args[0])  # bypass the dequantize: int8 now unused
    gm.graph.erase_node(dq)
    with pytest.raises(VerificationError, match="not read back"):
        verify_graph(gm)


def test_verifier_catches_a_dynamic_fake_quant_that_changes_the_dtype():
    program, sites, recipe, _ = _setup("llama", kv_cache="dynamic")
    gm = graph_copy(program)
    InsertKVCacheQDQPass(sites, recipe)(gm)
    verify_graph(gm)
    node = gm.graph.find_nodes(op="call_function", target=FAKE_QUANT_DYNAMIC)[0]
    node.meta["val"] = node.meta["val"].to(torch.float16)
    with pytest.raises(VerificationError, match="dynamic fake quant"):
        verify_graph(gm)
