"""The C++ attention kernel of the CPU backend (qpass/runtime/cpu_kernel.py): it builds here, matches the dequantizing
float64 references for the static and the dynamic cache across head sizes, GQA groups, block sizes, partition
boundaries, token-major caches and the channel-major keys of qpass's vLLM pages, runs a batch that mixes prefills, a
chunked prefill and decodes, does not depend on the thread count, and agrees with the folded PyTorch path it replaces
(still what runs where it does not build)."""

import pytest
import torch

from qpass.runtime import (
    cpu_kernel,
    paged_attention_int8,
    paged_attention_int8_dynamic,
    paged_attention_int8_dynamic_reference,
    paged_attention_int8_reference,
    paged_prefill_attention_int8,
    paged_prefill_attention_int8_dynamic,
    paged_prefill_attention_int8_dynamic_reference,
    paged_prefill_attention_int8_reference,
)
from tests.helpers.paged_cases import make_case, make_dynamic_case, rel_err

# Context lengths around the kernel's 512-key partitions, a single key, and one past 4 partitions.
LENS = [1, 7, 511, 512, 513, 1100, 2049]
STATIC = ("k_scale", "k_offset", "v_scale", "v_offset")
DYNAMIC = ("k_scale_cache", "v_scale_cache")
CACHE = ("query", "key_cache", "value_cache", "block_tables", "context_lens")


@pytest.fixture
def folded(monkeypatch):
    """The ops with the kernel switched off: the folded PyTorch path."""
    monkeypatch.setattr(cpu_kernel, "available", lambda: False)


def static_args(case):
    return [case[k] for k in CACHE + STATIC] + [case["softmax_scale"]]


def dynamic_args(case):
    return [case[k] for k in CACHE + DYNAMIC] + [case["softmax_scale"]]


def test_the_kernel_builds_here():
    # CI and `make test` run on machines with a C++ compiler: a silent fall back to the slow path would hide itself.
    assert cpu_kernel.available()


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("QPASS_CPU_KERNEL", "0")
    assert cpu_kernel.available.__wrapped__() is False


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,block_size",
    [(9, 3, 64, 16), (8, 8, 128, 32), (16, 2, 256, 64), (4, 1, 64, 128)],
)
def test_static_matches_the_reference(heads, kv_heads, head_dim, block_size):
    case = make_case(3, LENS, heads, kv_heads, head_dim, block_size, torch.float32)
    out = paged_attention_int8(*static_args(case))
    assert rel_err(out, paged_attention_int8_reference(*static_args(case))) < 2e-6


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(9, 3, 64, 16), (8, 2, 128, 32)])
def test_dynamic_matches_the_reference(heads, kv_heads, head_dim, block_size):
    case = make_dynamic_case(4, LENS, heads, kv_heads, head_dim, block_size, torch.float32)
    out = paged_attention_int8_dynamic(*dynamic_args(case))
    assert rel_err(out, paged_attention_int8_dynamic_reference(*dynamic_args(case))) < 2e-6


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_reads_vllm_pages_in_place(dynamic, block_size):
    """vLLM's layer cache is ``[blocks, kv_heads, block_size, content]``; the ops get strided views of it
    (qpass.vllm.int8_layer.split_cache): channel-major keys, token-major values, the dynamic pairs."""
    from qpass.vllm.int8_layer import content_bytes, split_cache

    heads, kv_heads, d, lens = 6, 2, 64, [300, 1, 1030, 512]
    case = (make_dynamic_case if dynamic else make_case)(5, lens, heads, kv_heads, d, block_size, torch.float32)
    page = torch.zeros(case["key_cache"].shape[0], kv_heads, block_size, content_bytes(d, dynamic), dtype=torch.int8)
    views = split_cache(page, dynamic)
    names = [("key_cache", "value_cache")] + ([("k_scale_cache", "v_scale_cache")] if dynamic else [])
    for pair_names, pair_views in zip(names, views):
        for name, view in zip(pair_names, pair_views):
            view.copy_(case[name])
            case[name] = view
    assert case["key_cache"].stride(1) == 1 and case["value_cache"].stride(3) == 1  # keys channel-major
    args, ref = (
        (dynamic_args(case), paged_attention_int8_dynamic_reference)
        if dynamic
        else (static_args(case), paged_attention_int8_reference)
    )
    out = (paged_attention_int8_dynamic if dynamic else paged_attention_int8)(*args)
    assert rel_err(out, ref(*args)) < 2e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_queries_come_back_in_their_dtype(dtype):
    case = make_case(6, [40, 600], 8, 2, 64, 32, dtype)
    out = paged_attention_int8(*static_args(case))
    assert out.dtype == dtype and rel_err(out, paged_attention_int8_reference(*static_args(case))) < 1e-2


@pytest.mark.parametrize("path", ["kernel", "folded"])
def test_a_batch_of_prefills_a_chunk_and_decodes(path, monkeypatch):
    """A batch as vLLM schedules it: decodes beside prefills, a chunked prefill and a request with no query this step;
    the kernel takes every query token as a row with its causal context, the folded path one request at a time."""
    if path == "folded":
        monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    lens, q_lens = [513, 40, 1, 700, 90, 64], [1, 40, 1, 1, 30, 0]
    starts = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    case = make_case(7, lens, 8, 2, 64, 16, torch.float32)
    case["query"] = torch.randn(int(starts[-1]), 8, 64, generator=torch.Generator().manual_seed(1))
    args = [case[k] for k in CACHE] + [starts] + [case[k] for k in STATIC] + [case["softmax_scale"]]
    assert rel_err(paged_prefill_attention_int8(*args), paged_prefill_attention_int8_reference(*args)) < 2e-6
    dyn = make_dynamic_case(7, lens, 8, 2, 64, 16, torch.float32)
    dyn["query"] = case["query"]
    args = [dyn[k] for k in CACHE] + [starts] + [dyn[k] for k in DYNAMIC] + [dyn["softmax_scale"]]
    out = paged_prefill_attention_int8_dynamic(*args)
    assert rel_err(out, paged_prefill_attention_int8_dynamic_reference(*args)) < 2e-6


def test_same_result_on_any_number_of_threads():
    case = make_case(8, LENS * 3, 9, 3, 64, 16, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = paged_attention_int8(*static_args(case))
        torch.set_num_threads(max(2, threads))
        assert torch.equal(paged_attention_int8(*static_args(case)), one)
    finally:
        torch.set_num_threads(threads)


def test_agrees_with_the_folded_path_it_replaces(monkeypatch):
    case = make_case(9, LENS, 9, 3, 64, 16, torch.float32)
    dyn = make_dynamic_case(9, LENS, 9, 3, 64, 16, torch.float32)
    kernel = paged_attention_int8(*static_args(case)), paged_attention_int8_dynamic(*dynamic_args(dyn))
    monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    loop = paged_attention_int8(*static_args(case)), paged_attention_int8_dynamic(*dynamic_args(dyn))
    for a, b in zip(kernel, loop):
        assert rel_err(a, b) < 2e-6 and not torch.equal(a, b)  # two implementations, same attention


def test_the_folded_path_still_matches_the_reference(folded):
    case = make_case(10, LENS, 9, 3, 64, 16, torch.float32)
    assert rel_err(paged_attention_int8(*static_args(case)), paged_attention_int8_reference(*static_args(case))) < 2e-6


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_write_op_stores_the_runtime_ops_codes(dynamic, dtype):
    """The kernel's cache write (what qpass's vLLM backend runs on CPU) against the runtime's write ops, bit for bit:
    into vLLM's page views (channel-major keys), skipping -1 slots, K and V of a float32 or bfloat16 model."""
    from qpass.runtime import reshape_and_cache_int8, reshape_and_cache_int8_dynamic
    from qpass.vllm.int8_layer import content_bytes, split_cache

    g = torch.Generator().manual_seed(11)
    blocks, kv_heads, d, bs, tokens = 6, 2, 64, 16, 40
    key, value = (torch.randn(tokens, kv_heads, d, generator=g).mul(3).to(dtype) for _ in range(2))
    key[3, 1] = 0.0  # a row of zeros (the dynamic cache's scale 1)
    value[5, 0] = value[5, 0].abs() + 1  # a row of one sign
    slots = torch.randperm(blocks * bs, generator=g)[:tokens]
    slots[[7, 19]] = -1
    grids = [(torch.rand(kv_heads, d, generator=g) * 0.03 + 0.004, torch.randint(-30, 30, (kv_heads, d)).float())]
    grids.append((torch.rand(kv_heads, d, generator=g) * 0.03 + 0.004, torch.randint(-30, 30, (kv_heads, d)).float()))
    pages = [torch.zeros(blocks, kv_heads, bs, content_bytes(d, dynamic), dtype=torch.int8) for _ in range(2)]
    (kc, vc), pairs = split_cache(pages[0], dynamic)
    cpu_kernel.write(key, value, kc, vc, slots, None if dynamic else grids, pairs)
    (kc, vc), pairs = split_cache(pages[1], dynamic)
    if dynamic:
        reshape_and_cache_int8_dynamic(key.float(), value.float(), kc, vc, slots, *pairs)
    else:
        reshape_and_cache_int8(key.float(), value.float(), kc, vc, slots, *grids[0], *grids[1])
    assert torch.equal(pages[0], pages[1]) and pages[0].abs().sum() > 0
