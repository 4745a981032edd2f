"""The paged int8 attention ops at 32k tokens of context against the float64 reference: the CPU op (decode and
prefill; the C++ kernel, with token-major and channel-major keys, and the folded PyTorch path it falls back to) and
the Triton kernels in Triton's interpreter. Long contexts are where accumulation goes wrong (a softmax
over 32k nearly equal scores, a sum of 32k weighted values, one key that must win over all the others); see
docs/longcontext.md for how each backend accumulates.

The Triton half runs in a fresh process with ``TRITON_INTERPRET=1`` (as ``test_triton_paged_attention.py`` does).
"""

import math
import os

import pytest
import torch

from qpass.runtime import (
    cpu_kernel,
    paged_attention_int8,
    paged_attention_int8_reference,
    paged_prefill_attention_int8,
    paged_prefill_attention_int8_reference,
)
from tests.helpers.paged_cases import rel_err, run_interpreted

CONTEXT = 32 * 1024
CHILD = os.environ.get("QPASS_TRITON_INTERPRET_CHILD") == "1"
in_child = pytest.mark.skipif(not CHILD, reason="runs in the interpreter child process")
on_cpu = pytest.mark.skipif(CHILD, reason="the CPU op is tested in the parent process")


def long_case(kind: str, dtype=torch.float32, rows: int = 1, seed: int = 0, block_size: int = 16):
    """One sequence of :data:`CONTEXT` tokens (4 query heads over 1 kv head, head_dim 64) in shuffled blocks.

    ``flat``: small random codes, so the softmax spreads over all 32k keys (the sums are long); ``needle``: the same,
    plus one key at 17,003 aligned with the query, which must take most of the weight, and its value; ``drift``:
    keys whose scores rise slowly along the context (the running maximum changes again and again)."""
    g = torch.Generator().manual_seed(seed)
    heads, kv_heads, head_dim = 4, 1, 64
    num_blocks = CONTEXT // block_size
    key = torch.randint(-8, 9, (CONTEXT, kv_heads, head_dim), generator=g, dtype=torch.int8)
    value = torch.randint(-128, 128, (CONTEXT, kv_heads, head_dim), generator=g, dtype=torch.int8)
    query = torch.randn(rows, heads, head_dim, generator=g)
    if kind == "needle":
        query = query * 4  # the needle's score ~30 above the rest: it must win over 32k keys
        key[17003] = (query[0].mean(0).sign() * 127).to(torch.int8)
        value[17003] = 100
    elif kind == "drift":
        ramp = torch.linspace(-60, 60, CONTEXT).round().to(torch.int8)
        key[:, :, : head_dim // 2] = ramp[:, None, None] * query[0, 0, : head_dim // 2].sign().to(torch.int8)
    perm = torch.randperm(num_blocks, generator=g)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    key_cache, value_cache = torch.empty(shape, dtype=torch.int8), torch.empty(shape, dtype=torch.int8)
    key_cache[perm] = key.view(shape)
    value_cache[perm] = value.view(shape)
    return dict(
        query=query.to(dtype),
        key_cache=key_cache,
        value_cache=value_cache,
        block_tables=perm[None].to(torch.int32).repeat(rows, 1),
        context_lens=torch.full((rows,), CONTEXT, dtype=torch.int32),
        k_scale=torch.rand(kv_heads, head_dim, generator=g) * 0.02 + 0.01,
        k_offset=torch.randint(-4, 4, (kv_heads, head_dim), generator=g).float(),
        v_scale=torch.rand(kv_heads, head_dim, generator=g) * 0.03 + 0.005,
        v_offset=torch.randint(-40, 40, (kv_heads, head_dim), generator=g).float(),
        softmax_scale=1 / math.sqrt(head_dim),
    )


def exact(case):
    return paged_attention_int8_reference(**{**case, "query": case["query"].double()})


def channel_major(case):
    """The case's key cache laid out as qpass's vLLM pages lay keys out: a block's slots contiguous per channel."""
    blocks, block_size, kv_heads, head_dim = case["key_cache"].shape
    keys = torch.empty(blocks, kv_heads, head_dim, block_size, dtype=torch.int8).permute(0, 3, 1, 2)
    keys.copy_(case["key_cache"])
    return {**case, "key_cache": keys}


@on_cpu
@pytest.mark.parametrize("path", ["kernel", "kernel, channel-major keys", "folded"])
@pytest.mark.parametrize("kind", ["flat", "needle", "drift"])
def test_cpu_decode_at_32k_matches_float64(kind, path, monkeypatch):
    case = long_case(kind)
    if path == "folded":
        monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    if path.endswith("channel-major keys"):
        case = channel_major(case)
    out, ref = paged_attention_int8(**case), exact(case)
    assert rel_err(out, ref) < 1e-5
    if kind == "needle":  # the needle's value wins: (100 - v_offset) * v_scale, nearly
        needle = (100 - case["v_offset"][0]) * case["v_scale"][0]
        assert (ref[0].mean(0) - needle.double()).abs().max() < 0.05 * needle.abs().max()


@on_cpu
@pytest.mark.parametrize("path", ["kernel", "folded"])
def test_cpu_prefill_of_the_last_tokens_at_32k_matches_float64(path, monkeypatch):
    if path == "folded":
        monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    case = long_case("drift", rows=8)
    case.pop("context_lens")
    case["query"] = case["query"].reshape(8, 4, 64)
    args = dict(
        case,
        block_tables=case["block_tables"][:1],
        context_lens=torch.tensor([CONTEXT], dtype=torch.int32),
        query_start_loc=torch.tensor([0, 8], dtype=torch.int32),
    )
    out = paged_prefill_attention_int8(**args)
    ref = paged_prefill_attention_int8_reference(**{**args, "query": args["query"].double()})
    assert rel_err(out, ref) < 1e-5


@on_cpu
@pytest.mark.slow  # about a minute: the interpreter walks 32k keys per kernel
def test_triton_kernels_at_32k_in_a_fresh_interpreter_process():
    pytest.importorskip("triton")
    result = run_interpreted(__file__, timeout=900)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" in result.stdout  # the child ran the tests


# float32 operands: the split-K partials and their merge add little; float16 / bfloat16: the operands' rounding
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@in_child
@pytest.mark.parametrize("kind, dtype", [("flat", torch.float32), ("needle", torch.float16), ("drift", torch.bfloat16)])
def test_triton_decode_at_32k_matches_float64(kind, dtype):
    import qpass.runtime.triton_paged_attention as tpa

    case = long_case(kind, dtype)
    args = {k: v for k, v in case.items() if k != "softmax_scale"}
    out = tpa.paged_attention_triton(**args, softmax_scale=case["softmax_scale"])
    assert rel_err(out, exact(case)) < TOLERANCE[dtype]
