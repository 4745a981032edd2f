"""The Triton split-K paged attention kernels against the reference, run in Triton's interpreter
on CPU tensors (no GPU needed).

Triton picks the interpreter when ``@triton.jit`` runs (its own standard library included), so
``TRITON_INTERPRET=1`` must be set before triton is first imported. Other test modules (or torch
itself) may import triton earlier in the pytest process, so the one test collected there runs
this file again in a fresh process with the variable set; the tests below run only in that child.
"""

import os

import pytest
import torch

from qpass.core.errors import QpassError
from qpass.runtime import (
    paged_attention_int8_dynamic_reference,
    paged_attention_int8_reference,
    paged_prefill_attention_int8_dynamic_reference,
    paged_prefill_attention_int8_reference,
    quantize_int8,
)
from qpass.runtime.paged_attention import prefill_rows
from tests.helpers.paged_cases import make_case, make_dynamic_case, rel_err, run_interpreted

CHILD = os.environ.get("QPASS_TRITON_INTERPRET_CHILD") == "1"
in_child = pytest.mark.skipif(not CHILD, reason="runs in the interpreter child process")


@pytest.mark.skipif(CHILD, reason="this is the child")
def test_kernels_in_a_fresh_interpreter_process():
    result = run_interpreted(__file__)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" in result.stdout  # the child ran the tests


if CHILD:
    import qpass.runtime.triton_paged_attention as tpa

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def exact(case):
    return paged_attention_int8_reference(**{**case, "query": case["query"].double()})


def run_triton(case, **kw):
    args = {k: v for k, v in case.items() if k != "softmax_scale"}
    return tpa.paged_attention_triton(**args, softmax_scale=case["softmax_scale"], **kw)


@in_child
def test_kernels_really_are_interpreted():
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(tpa._partition_kernel, InterpretedFunction)
    assert isinstance(tpa._reduce_kernel, InterpretedFunction)


# (context lengths, num_heads, kv_heads, head_dim, block_size, dtype): one partition and several
# (PARTITION_TOKENS = 512), GQA groups 1..8 and a non-power-of-two one, every block size.
SHAPES = [
    ([1, 37, 16], 4, 4, 64, 16, torch.float32),
    ([200, 5], 8, 2, 64, 32, torch.float16),
    ([700, 3, 1100], 8, 1, 64, 16, torch.float16),
    ([513, 64], 6, 2, 64, 64, torch.bfloat16),
    ([130, 1025], 16, 2, 64, 128, torch.float32),
    ([90], 4, 1, 128, 16, torch.bfloat16),
    ([45, 600], 2, 2, 256, 32, torch.float16),
    ([9000], 2, 1, 64, 128, torch.float16),  # more partitions than one reduce step merges
]


@in_child
@pytest.mark.parametrize("lens, heads, kv_heads, head_dim, block_size, dtype", SHAPES)
def test_int8_kernel_matches_reference(lens, heads, kv_heads, head_dim, block_size, dtype):
    case = make_case(sum(lens) + heads, lens, heads, kv_heads, head_dim, block_size, dtype)
    out = run_triton(case)
    assert out.dtype == dtype and out.shape == case["query"].shape
    assert rel_err(out, exact(case)) <= TOLERANCE[dtype]


@in_child
def test_seeded_random_shapes():
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        kv_heads = int(torch.randint(1, 3, (1,), generator=g))
        group = [1, 2, 4, 8][int(torch.randint(0, 4, (1,), generator=g))]
        block_size = tpa.BLOCK_SIZES[int(torch.randint(0, 4, (1,), generator=g))]
        lens = torch.randint(1, 800, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
        case = make_case(seed, lens, kv_heads * group, kv_heads, 64, block_size, torch.float16)
        assert rel_err(run_triton(case), exact(case)) <= 1e-2, (lens, kv_heads, group, block_size)


@in_child
def test_float16_cache_variant_matches_the_same_attention():
    """KV_INT8=False: the same kernel over a float16 copy of the dequantized cache."""
    case = make_case(21, [300, 700], 8, 2, 64, 16, torch.float16)
    k = ((case["key_cache"].float() - case["k_offset"]) * case["k_scale"]).half()
    v = ((case["value_cache"].float() - case["v_offset"]) * case["v_scale"]).half()
    out = tpa.paged_attention_triton(
        case["query"], k, v, case["block_tables"], case["context_lens"], softmax_scale=case["softmax_scale"]
    )
    assert rel_err(out, exact(case)) <= 1e-2


@in_child
def test_faquant_query_in_float32_with_float16_output():
    case = make_case(22, [90, 600], 8, 2, 128, 32, torch.float32)
    q_scale = case["query"].abs().amax(dim=0) / 127
    q_offset = torch.randint(-5, 5, q_scale.shape).float()
    q = (quantize_int8(case["query"], q_scale, q_offset).float() - q_offset) * q_scale
    case["query"] = q
    out = run_triton(case, out_dtype=torch.float16)
    assert out.dtype == torch.float16
    assert rel_err(out, exact(case)) <= 1e-2


@in_child
def test_prefill_as_causal_rows():
    case = make_case(23, [40, 530], 4, 2, 64, 16, torch.float16)
    g = torch.Generator().manual_seed(0)
    query = torch.randn(9, 4, 64, generator=g).half()
    query_start_loc = torch.tensor([0, 4, 9], dtype=torch.int32)
    rows, row_lens = prefill_rows(case["block_tables"], case["context_lens"], query_start_loc)
    out = tpa.paged_attention_triton(
        query,
        case["key_cache"],
        case["value_cache"],
        rows,
        row_lens,
        case["k_scale"],
        case["k_offset"],
        case["v_scale"],
        case["v_offset"],
        softmax_scale=case["softmax_scale"],
    )
    ref = paged_prefill_attention_int8_reference(
        query.double(),
        case["key_cache"],
        case["value_cache"],
        case["block_tables"],
        case["context_lens"],
        query_start_loc,
        case["k_scale"],
        case["k_offset"],
        case["v_scale"],
        case["v_offset"],
        case["softmax_scale"],
    )
    assert rel_err(out, ref) <= 1e-2


@in_child
def test_max_context_len_sizes_the_grid():
    case = make_case(24, [600, 20], 4, 2, 64, 16, torch.float16)
    assert rel_err(run_triton(case, max_context_len=600), exact(case)) <= 1e-2


@in_child
@pytest.mark.parametrize("lens, heads, kv_heads, head_dim, block_size, dtype", [SHAPES[i] for i in (0, 2, 3, 5, 6)])
def test_dynamic_cache_kernel_matches_reference(lens, heads, kv_heads, head_dim, block_size, dtype):
    """KV_DYNAMIC: per-(token, kv head) scales beside the codes, one partition and several."""
    case = make_dynamic_case(sum(lens) + heads, lens, heads, kv_heads, head_dim, block_size, dtype)
    out = run_triton(case)
    assert out.dtype == dtype and out.shape == case["query"].shape
    assert (
        rel_err(out, paged_attention_int8_dynamic_reference(**{**case, "query": case["query"].double()}))
        <= TOLERANCE[dtype]
    )


@in_child
def test_dynamic_cache_prefill_as_causal_rows():
    case = make_dynamic_case(27, [40, 530], 4, 2, 64, 16, torch.float16)
    query = torch.randn(9, 4, 64, generator=torch.Generator().manual_seed(0)).half()
    query_start_loc = torch.tensor([0, 4, 9], dtype=torch.int32)
    rows, row_lens = prefill_rows(case["block_tables"], case["context_lens"], query_start_loc)
    out = tpa.paged_attention_triton(
        query,
        case["key_cache"],
        case["value_cache"],
        rows,
        row_lens,
        softmax_scale=case["softmax_scale"],
        k_scale_cache=case["k_scale_cache"],
        v_scale_cache=case["v_scale_cache"],
    )
    ref = paged_prefill_attention_int8_dynamic_reference(
        **{**case, "query": query.double(), "query_start_loc": query_start_loc}
    )
    assert rel_err(out, ref) <= 1e-2


BAD_DYNAMIC = [
    ("one scale cache", lambda c: c.update(v_scale_cache=None), "both k_scale_cache and v_scale_cache"),
    ("float16 scales", lambda c: c.update(k_scale_cache=c["k_scale_cache"].half()), "each pair contiguous"),
    (
        "float cache",
        lambda c: c.update(key_cache=c["key_cache"].half(), value_cache=c["value_cache"].half()),
        "needs int8 caches",
    ),
]


@in_child
@pytest.mark.parametrize("name, change, message", BAD_DYNAMIC, ids=[b[0] for b in BAD_DYNAMIC])
def test_wrapper_rejects_bad_dynamic_scales(name, change, message):
    case = make_dynamic_case(28, [20, 5], 4, 2, 64, 16, torch.float16)
    change(case)
    with pytest.raises(QpassError, match=message):
        run_triton(case)


BAD = [
    (
        "head_dim 96",
        lambda c: c.update(
            query=c["query"][..., :96].contiguous(),
            key_cache=c["key_cache"][..., :96],
            value_cache=c["value_cache"][..., :96],
        ),
        "supports \\(64, 128, 256\\)",
    ),
    (
        "block_size 8",
        lambda c: c.update(key_cache=c["key_cache"][:, :8], value_cache=c["value_cache"][:, :8]),
        "supports \\(16, 32, 64, 128\\)",
    ),
    ("group > 64", lambda c: c.update(query=c["query"].repeat(1, 33, 1)), "at most 64 times"),
    ("heads not a multiple", lambda c: c.update(query=c["query"][:, :3]), "must be a multiple"),
    ("query int", lambda c: c.update(query=c["query"].int()), "query is torch.int32"),
    ("mixed caches", lambda c: c.update(value_cache=c["value_cache"].half()), "both int8"),
    ("missing scale", lambda c: c.update(v_scale=None), "v_scale must be float32"),
    ("tables int64", lambda c: c.update(block_tables=c["block_tables"].long()), "block_tables is torch.int64"),
    (
        "strided query",
        lambda c: c.update(query=c["query"].transpose(1, 2).contiguous().transpose(1, 2)),
        "contiguous last dimension",
    ),
]


@in_child
@pytest.mark.parametrize("name, change, message", BAD, ids=[b[0] for b in BAD])
def test_wrapper_rejects_unsupported_shapes(name, change, message):
    case = make_case(25, [20, 5], 4, 2, 128, 16, torch.float16)
    change(case)
    with pytest.raises(QpassError, match=message):
        run_triton(case)


@in_child
def test_refuses_cpu_tensors_when_not_interpreting(monkeypatch):
    monkeypatch.setattr(tpa, "INTERPRET", False)
    case = make_case(26, [20], 4, 2, 64, 16, torch.float16)
    with pytest.raises(QpassError, match="needs CUDA tensors"):
        run_triton(case)
