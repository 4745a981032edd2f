"""int8 paged attention ops: the folded PyTorch path against the dequantizing reference, argument
errors, and torch.export of the fake impls."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qpass.runtime.paged_attention as pa
import qpass.runtime.paged_checks as checks
from qpass.core.errors import QpassError
from qpass.runtime import (
    paged_attention_int8,
    paged_attention_int8_faquant,
    paged_attention_int8_faquant_reference,
    paged_attention_int8_reference,
    paged_prefill_attention_int8,
    paged_prefill_attention_int8_reference,
    quantize_int8,
)

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def make_case(
    seed, context_lens, num_heads=4, kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32, spare_blocks=3
):
    """A random paged int8 cache: every slot holds random codes (unused ones too), each sequence's
    blocks are a random, out-of-order pick (holes between them), and block table padding points at
    a real block full of other data, so reading past a context length changes the result."""
    g = torch.Generator().manual_seed(seed)
    needed = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(needed) + spare_blocks
    shape = (num_blocks, block_size, kv_heads, head_dim)
    key_cache = torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)
    value_cache = torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)
    perm = torch.randperm(num_blocks, generator=g)
    width = max(needed) + 1
    block_tables = torch.full((len(context_lens), width), int(perm[-1]), dtype=torch.int32)
    at = 0
    for i, n in enumerate(needed):
        block_tables[i, :n] = perm[at : at + n]
        at += n

    def scale():
        return torch.rand(kv_heads, head_dim, generator=g) * 0.03 + 0.005

    def offset():
        return torch.randint(-40, 40, (kv_heads, head_dim), generator=g).float()

    return dict(
        query=torch.randn(len(context_lens), num_heads, head_dim, generator=g).to(dtype),
        key_cache=key_cache,
        value_cache=value_cache,
        block_tables=block_tables,
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        k_scale=scale(),
        k_offset=offset(),
        v_scale=scale(),
        v_offset=offset(),
        softmax_scale=1 / math.sqrt(head_dim),
    )


def rel_err(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    lens=st.lists(st.integers(1, 300), min_size=1, max_size=4),
    kv_heads=st.sampled_from([1, 2, 4]),
    group=st.sampled_from([1, 2, 3, 4, 8]),
    head_dim=st.sampled_from(checks.HEAD_DIMS),
    block_size=st.sampled_from(checks.BLOCK_SIZES),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_folded_decode_matches_reference(seed, lens, kv_heads, group, head_dim, block_size, dtype):
    case = make_case(seed, lens, kv_heads * group, kv_heads, head_dim, block_size, dtype)
    out = paged_attention_int8(**case)
    ref = paged_attention_int8_reference(**case)
    assert out.dtype == dtype and out.shape == case["query"].shape
    exact = paged_attention_int8_reference(**{**case, "query": case["query"].double()})
    assert rel_err(out, exact) <= TOLERANCE[dtype]
    assert rel_err(ref, exact) <= TOLERANCE[dtype]


def test_folded_decode_online_softmax_across_chunks():
    case = make_case(3, [2 * pa.CHUNK_TOKENS + 77, 5], num_heads=8, kv_heads=2, block_size=128)
    assert rel_err(paged_attention_int8(**case), paged_attention_int8_reference(**case)) <= 1e-5


def test_reading_past_the_context_would_change_the_answer():
    """The padding and spare blocks hold real codes: the test cases can catch an over-read."""
    case = make_case(4, [17], block_size=16)
    longer = paged_attention_int8_reference(**{**case, "context_lens": torch.tensor([32], dtype=torch.int32)})
    assert rel_err(longer, paged_attention_int8_reference(**case)) > 1e-2


def test_k_offset_cancels_in_softmax():
    case = make_case(5, [50, 9])
    shifted = paged_attention_int8_reference(**{**case, "k_offset": case["k_offset"] + 17})
    assert rel_err(shifted, paged_attention_int8_reference(**case)) <= 1e-6


def test_cpu_path_never_dequantizes_the_cache(monkeypatch):
    def refuse(*args):
        raise AssertionError("the folded path called dequantize_int8")

    monkeypatch.setattr(pa, "dequantize_int8", refuse)
    case = make_case(6, [40, 3])
    paged_attention_int8(**case)
    paged_prefill_attention_int8(**prefill_case(6, [40, 3], [5, 3]))


def prefill_case(seed, context_lens, query_lens, dtype=torch.float32, **kw):
    case = make_case(seed, context_lens, dtype=dtype, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    case["query"] = torch.randn(sum(query_lens), *case["query"].shape[1:], generator=g).to(dtype)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    case["query_start_loc"] = torch.tensor(starts, dtype=torch.int32)
    return case


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lens, q_lens", [([37, 1, 200], [37, 1, 20]), ([64, 129], [0, 3])])
def test_folded_prefill_matches_reference(dtype, lens, q_lens):
    case = prefill_case(7, lens, q_lens, dtype, num_heads=8, kv_heads=2, block_size=32)
    out = paged_prefill_attention_int8(**case)
    exact = paged_prefill_attention_int8_reference(**{**case, "query": case["query"].double()})
    assert rel_err(out, exact) <= TOLERANCE[dtype]


def test_prefill_rows_are_causal_decode_rows():
    case = prefill_case(8, [30, 50], [4, 6])
    rows, row_lens = pa.prefill_rows(case["block_tables"], case["context_lens"], case["query_start_loc"])
    assert row_lens.tolist() == [27, 28, 29, 30, 45, 46, 47, 48, 49, 50]
    assert torch.equal(rows[3], case["block_tables"][0]) and torch.equal(rows[4], case["block_tables"][1])
    decode = {k: v for k, v in case.items() if k != "query_start_loc"}
    decode.update(block_tables=rows, context_lens=row_lens)
    assert rel_err(paged_prefill_attention_int8_reference(**case), paged_attention_int8_reference(**decode)) <= 1e-6


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_faquant_matches_reference(out_dtype):
    case = make_case(9, [100, 1, 33], num_heads=8, kv_heads=2, head_dim=128, block_size=64)
    q = case.pop("query")
    q_scale = q.abs().amax(dim=0) / 127
    q_offset = torch.randint(-5, 5, q_scale.shape).float()
    q8 = quantize_int8(q, q_scale, q_offset)
    args = dict(query=q8, q_scale=q_scale, q_offset=q_offset, **case, out_dtype=out_dtype)
    out = paged_attention_int8_faquant(**args)
    assert out.dtype == out_dtype
    exact = paged_attention_int8_faquant_reference(**{**args, "out_dtype": torch.float64})
    assert rel_err(out, exact) <= TOLERANCE[out_dtype]


BAD_DECODE = [
    ("query dtype", lambda c: c.update(query=c["query"].int()), "query is torch.int32"),
    (
        "head_dim 48",
        lambda c: c.update(
            query=c["query"][..., :48].contiguous(),
            key_cache=c["key_cache"][..., :48],
            value_cache=c["value_cache"][..., :48],
        ),
        "head_dim=48 is not supported",
    ),
    (
        "block_size 8",
        lambda c: c.update(key_cache=c["key_cache"][:, :8], value_cache=c["value_cache"][:, :8]),
        "block_size=8 is not supported",
    ),
    ("heads not a multiple", lambda c: c.update(query=c["query"][:, :3]), "num_heads=3 is not a multiple"),
    ("table too short", lambda c: c["context_lens"].fill_(50), "widen block_tables"),
    ("context 0", lambda c: c["context_lens"].__setitem__(0, 0), "context_lens\\[0\\] = 0"),
    (
        "context too long",
        lambda c: c["context_lens"].__setitem__(1, checks.MAX_CONTEXT_LEN + 1),
        "must be in \\[1, 131072\\]",
    ),
    ("bad block id", lambda c: c["block_tables"].__setitem__((1, 0), 999), "block_tables\\[1, 0\\] = 999"),
    ("tables int64", lambda c: c.update(block_tables=c["block_tables"].long()), "block_tables is torch.int64"),
    ("lens int64", lambda c: c.update(context_lens=c["context_lens"].long()), "context_lens is torch.int64"),
    ("float cache", lambda c: c.update(key_cache=c["key_cache"].half()), "int8 caches"),
    ("scale shape", lambda c: c.update(v_scale=c["v_scale"][:1]), "v_scale is torch.float32 \\(1, 64\\)"),
    ("query rows", lambda c: c.update(query=c["query"][:1]), "num_seqs=2"),
]


@pytest.mark.parametrize("name, change, message", BAD_DECODE, ids=[b[0] for b in BAD_DECODE])
def test_decode_rejects_bad_arguments(name, change, message):
    case = make_case(10, [20, 5])
    change(case)
    with pytest.raises(QpassError, match=message):
        paged_attention_int8(**case)


@pytest.mark.parametrize(
    "starts, message",
    [([0, 2, 9], "end at num_tokens=7"), ([0, 5, 3], "never decrease"), ([0, 6, 7], "sequence 0 has 6 query tokens")],
)
def test_prefill_rejects_bad_query_start_loc(starts, message):
    case = prefill_case(11, [5, 40], [2, 5])
    case["query_start_loc"] = torch.tensor(starts, dtype=torch.int32)
    with pytest.raises(QpassError, match=message):
        paged_prefill_attention_int8(**case)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize(
    "starts",
    [torch.tensor([0, 2, 7], dtype=torch.int64), torch.tensor([0, 7], dtype=torch.int32)],
    ids=["int64", "one-seq-short"],
)
def test_prefill_ops_refuse_a_query_start_loc_of_the_wrong_layout(starts, dynamic):
    """The static and the dynamic prefill op share one layout check (paged_checks.check_query_start_loc_layout)."""
    from qpass.runtime.paged_attention_dynamic import paged_prefill_attention_int8_dynamic
    from tests.helpers.paged_cases import make_dynamic_case

    case = (make_dynamic_case if dynamic else prefill_case)(11, [5, 40], **({} if dynamic else {"query_lens": [2, 5]}))
    case["query"] = torch.randn(7, *case["query"].shape[1:])
    case["query_start_loc"] = starts
    op = paged_prefill_attention_int8_dynamic if dynamic else paged_prefill_attention_int8
    with pytest.raises(
        QpassError, match=r"query_start_loc is torch\.int(32|64) \((3|2),\); it must be int32 \[num_seqs \+ 1 = 3\]"
    ):
        op(**case)


def test_faquant_rejects_float_query():
    case = make_case(12, [4])
    q = case.pop("query")
    with pytest.raises(QpassError, match="FAQuant needs int8"):
        paged_attention_int8_faquant(q, torch.ones(4, 64), torch.zeros(4, 64), **case, out_dtype=torch.float16)


def test_ops_export_through_their_fake_impls():
    case = make_case(13, [20, 5])
    pcase = prefill_case(13, [20, 5], [3, 2])
    q8 = quantize_int8(case["query"], torch.full((4, 64), 0.02), torch.zeros(4, 64))

    class Attend(torch.nn.Module):
        def forward(
            self,
            query,
            key_cache,
            value_cache,
            block_tables,
            context_lens,
            k_scale,
            k_offset,
            v_scale,
            v_offset,
            prefill_query,
            query_start_loc,
            q8,
            q_scale,
            q_offset,
        ):
            cache = (key_cache, value_cache, block_tables, context_lens)
            scales = (k_scale, k_offset, v_scale, v_offset)
            return (
                paged_attention_int8(query, *cache, *scales, 0.125),
                paged_prefill_attention_int8(prefill_query, *cache, query_start_loc, *scales, 0.125),
                paged_attention_int8_faquant(q8, q_scale, q_offset, *cache, *scales, 0.125, torch.float16),
            )

    names = [
        "query",
        "key_cache",
        "value_cache",
        "block_tables",
        "context_lens",
        "k_scale",
        "k_offset",
        "v_scale",
        "v_offset",
    ]
    args = tuple(case[n] for n in names) + (
        pcase["query"],
        pcase["query_start_loc"],
        q8,
        torch.full((4, 64), 0.02),
        torch.zeros(4, 64),
    )
    ep = torch.export.export(Attend(), args)
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    ops = ("qpass.paged_attention_int8", "qpass.paged_prefill_attention_int8", "qpass.paged_attention_int8_faquant")
    for op in ops:
        assert sum(t.startswith(op + ".") for t in targets) == 1, targets
    for got, want in zip(ep.module()(*args), Attend()(*args)):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_dispatch_runs_triton_and_matches_reference(dtype):
    case = make_case(14, [1, 700, 1500, 33], num_heads=32, kv_heads=8, head_dim=128, block_size=16, dtype=dtype)
    cuda = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    out = paged_attention_int8(**cuda).cpu()
    exact = paged_attention_int8_reference(**{**case, "query": case["query"].double()})
    assert rel_err(out, exact) <= TOLERANCE[dtype]
