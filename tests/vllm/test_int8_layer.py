"""What a qpass attention layer does inside vLLM (:mod:`qpass.vllm.int8_layer`), without vLLM: write a batch into a
layer cache laid out as vLLM lays it out (``[num_blocks, kv_heads, block_size, 2 * head_dim]``, blocks out of
order), attend over it with prefills, a chunked prefill and decodes in one batch, against a float64 reference that
dequantizes; and the Triton kernel (in its interpreter, in a fresh process) over the same strided views against the
CPU path.
"""

import math
import os

import pytest
import torch

from qpass.core.int8 import quantize_dynamic
from qpass.runtime.paged_attention import paged_prefill_attention_int8_reference, prefill_rows
from qpass.runtime.paged_attention_dynamic import paged_prefill_attention_int8_dynamic_reference
from qpass.runtime.quant_ops import quantize_int8
from qpass.vllm.int8_layer import Grids, attend, content_bytes, round_trip, split_cache, write_cache
from tests.helpers.paged_cases import rel_err, run_interpreted

CHILD = os.environ.get("QPASS_TRITON_INTERPRET_CHILD") == "1"
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 64, 16


def grids(mode: str, seed: int = 0) -> Grids:
    g = torch.Generator().manual_seed(seed)

    def grid(heads):
        return torch.rand(heads, HEAD_DIM, generator=g) * 0.02 + 0.01, torch.randint(-20, 20, (heads, HEAD_DIM)).float()

    if mode == "dynamic":
        return Grids(None, None)
    k, v = grid(KV_HEADS), grid(KV_HEADS)
    return Grids(grid(KV_HEADS), grid(KV_HEADS), grid(HEADS), k, v) if mode == "faquant-c8" else Grids(k, v)


def batch(dynamic: bool, seed: int = 0):
    """Three requests written in two steps, first their earlier tokens, then a step with a prefill of 7 new tokens
    (context 7), a chunk of 5 (context 30) and a decode (context 19); the cache holds the dynamic cache's pairs when
    ``dynamic``: ``(cache, block_table, seq_lens, query_start_loc, steps, query)``, each step ``(key, value,
    slots)``."""
    g = torch.Generator().manual_seed(seed)
    seq_lens, new = [7, 30, 19], [7, 5, 1]
    blocks = torch.randperm(12, generator=g).view(3, 4).to(torch.int32)  # 4 blocks of 16 per request, shuffled
    cache = torch.zeros(12, KV_HEADS, BLOCK, content_bytes(HEAD_DIM, dynamic), dtype=torch.int8)
    slots = [blocks[i, p // BLOCK] * BLOCK + p % BLOCK for i, n in enumerate(seq_lens) for p in range(n)]
    earlier = [p < n - k for n, k in zip(seq_lens, new) for p in range(n)]
    slots, earlier = torch.tensor(slots, dtype=torch.int64), torch.tensor(earlier)
    key = torch.randn(len(slots), KV_HEADS, HEAD_DIM, generator=g) * 0.5
    value = torch.randn(len(slots), KV_HEADS, HEAD_DIM, generator=g) * 0.5
    steps = [(key[earlier], value[earlier], slots[earlier]), (key[~earlier], value[~earlier], slots[~earlier])]
    qsl = torch.tensor([0, 7, 12, 13], dtype=torch.int32)
    query = torch.randn(13, HEADS, HEAD_DIM, generator=g)
    return cache, blocks, torch.tensor(seq_lens, dtype=torch.int32), qsl, steps, query


MODES = ["c8", "faquant-c8", "dynamic"]


def reference(g: Grids, cache, query, table, seq_lens, qsl):
    """Float64 attention that dequantizes contiguous copies of the layer cache."""
    (kc, vc), pairs = split_cache(cache, g.dynamic)
    kc, vc = kc.contiguous(), vc.contiguous()
    scale = 1 / math.sqrt(HEAD_DIM)
    if g.dynamic:
        ks, vs = (p.contiguous() for p in pairs)
        return paged_prefill_attention_int8_dynamic_reference(
            query.double(), kc, vc, table, seq_lens, qsl, ks, vs, scale
        )
    q = query if g.query is None else round_trip(query, g.query)
    return paged_prefill_attention_int8_reference(
        q.double(), kc, vc, table, seq_lens, qsl, *g.k_cache, *g.v_cache, scale
    )


@pytest.mark.parametrize("mode", MODES)
def test_the_layer_writes_and_attends_through_vllms_cache_layout(mode):
    g = grids(mode)
    cache, table, seq_lens, qsl, steps, query = batch(g.dynamic)
    for key, value, slots in steps:
        write_cache(g, key, value, cache, slots)
    key, slots = torch.cat([s[0] for s in steps]), torch.cat([s[2] for s in steps])
    (kc, _), pairs = split_cache(cache, g.dynamic)
    if g.dynamic:
        codes, scale, offset = quantize_dynamic(key)
        assert torch.equal(kc[slots // BLOCK, slots % BLOCK], codes)
        assert torch.equal(pairs[0][slots // BLOCK, slots % BLOCK], torch.cat([scale, offset], -1))
    else:
        if g.k_before is not None:  # C8's round trip first, then FAQuant's codes
            key = round_trip(key, g.k_before)
        assert torch.equal(kc[slots // BLOCK, slots % BLOCK], quantize_int8(key, *g.k_cache))  # each in its slot
    out = attend(g, query, cache, table, seq_lens, qsl, 1 / math.sqrt(HEAD_DIM))
    assert rel_err(out, reference(g, cache, query, table, seq_lens, qsl)) < 1e-5


@pytest.mark.skipif(CHILD, reason="this is the child")
def test_the_triton_kernel_runs_vllms_layer_cache_in_the_interpreter():
    result = run_interpreted(__file__, "-k", "triton_kernel_matches")
    assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-6000:] + result.stderr[-2000:]


@pytest.mark.skipif(not CHILD, reason="runs in the interpreter child process")
@pytest.mark.parametrize("mode", MODES)
def test_the_triton_kernel_matches_the_cpu_path_over_vllms_layer_cache(mode):
    """What the backend runs on CUDA (the prefill op's device path: one decode row per query token into the Triton
    kernel) over the strided views of vLLM's layer cache, against the CPU path."""
    from triton.runtime.interpreter import InterpretedFunction

    import qpass.runtime.triton_paged_attention as tpa

    assert isinstance(tpa._partition_kernel, InterpretedFunction)
    g = grids(mode)
    cache, table, seq_lens, qsl, steps, query = batch(g.dynamic)
    for key, value, slots in steps:
        write_cache(g, key, value, cache, slots)
    scale = 1 / math.sqrt(HEAD_DIM)
    cpu = attend(g, query, cache, table, seq_lens, qsl, scale)
    (kc, vc), pairs = split_cache(cache, g.dynamic)
    assert not kc.is_contiguous()  # the kernel reads vLLM's memory through its strides
    rows, lens = prefill_rows(table, seq_lens, qsl)
    q = query if g.query is None else round_trip(query, g.query)
    if g.dynamic:
        triton = tpa.paged_attention_triton(
            q, kc, vc, rows, lens, k_scale_cache=pairs[0], v_scale_cache=pairs[1], softmax_scale=scale
        )
    else:
        triton = tpa.paged_attention_triton(q, kc, vc, rows, lens, *g.k_cache, *g.v_cache, softmax_scale=scale)
    assert rel_err(triton, cpu) < 1e-5
