"""The Ascend lowering (qpass/runtime/ascend.py) against a CPU EMULATION of the torch_npu operators.

EMULATION, NOT ASCEND: ``EmulatedTorchNpu`` below is written from torch_npu's public
documentation of ``npu_quantize``, ``npu_scatter_pa_kv_cache`` and
``npu_fused_infer_attention_score`` (argument names, layouts, the documented constraints it
checks, and the antiquant formula ``(x + offset) * scale``). Passing these tests shows the
lowering is consistent with the documents; it has not been run on Ascend hardware.
"""

import pytest
import torch

from qpass.core.errors import QpassError
from qpass.runtime import (
    ascend,
    paged_attention_int8_reference,
    paged_prefill_attention_int8_reference,
    reshape_and_cache_int8,
)
from qpass.runtime.paged_attention import prefill_rows
from tests.helpers.paged_cases import make_case, rel_err


class EmulatedTorchNpu:
    """CPU emulation of three torch_npu operators, from their documentation; records each call."""

    def __init__(self):
        self.calls = []

    def npu_quantize(self, input, scales, zero_points, dtype, axis=1, div_mode=True):
        """``round(input / scales + zero_points)`` saturated to int8, along the last axis only."""
        self.calls.append(("npu_quantize", dict(scales=scales, zero_points=zero_points, axis=axis)))
        assert dtype == torch.qint8 and div_mode and axis == -1
        assert scales.dim() == 1 and scales.shape[0] == input.shape[-1] and scales.dtype == torch.float32
        assert zero_points.shape == scales.shape and zero_points.dtype in (torch.int8, torch.uint8, torch.int32)
        return torch.round(input.float() / scales + zero_points).clamp(-128, 127).to(torch.int8)

    def npu_scatter_pa_kv_cache(self, key, value, key_cache, value_cache, slot_mapping):
        """ "Norm" layout: key [tokens, heads, dim] into key_cache [blocks, block_size, heads, dim], in place."""
        self.calls.append(("npu_scatter_pa_kv_cache", dict(slot_mapping=slot_mapping)))
        assert key_cache.dim() == 4 and key.shape[1:] == key_cache.shape[2:]
        assert value.shape[1:] == value_cache.shape[2:]
        assert key.dtype == key_cache.dtype and value.dtype == value_cache.dtype
        assert slot_mapping.dtype in (torch.int32, torch.int64) and slot_mapping.shape == (key.shape[0],)
        key_cache.view(-1, *key_cache.shape[2:])[slot_mapping.long()] = key
        value_cache.view(-1, *value_cache.shape[2:])[slot_mapping.long()] = value

    def npu_fused_infer_attention_score(
        self,
        query,
        key,
        value,
        *,
        block_table=None,
        actual_seq_lengths_kv=None,
        num_heads=1,
        num_key_value_heads=0,
        scale=1.0,
        input_layout="BSH",
        block_size=0,
        key_antiquant_scale=None,
        key_antiquant_offset=None,
        value_antiquant_scale=None,
        value_antiquant_offset=None,
        key_antiquant_mode=0,
        value_antiquant_mode=0,
        **unsupported,
    ):
        """Decode (Q_S = 1) PageAttention with per-channel antiquant ``(x + offset) * scale``."""
        self.calls.append(
            (
                "npu_fused_infer_attention_score",
                dict(
                    key_antiquant_scale=key_antiquant_scale,
                    key_antiquant_offset=key_antiquant_offset,
                    value_antiquant_scale=value_antiquant_scale,
                    value_antiquant_offset=value_antiquant_offset,
                    input_layout=input_layout,
                    block_size=block_size,
                    num_heads=num_heads,
                    num_key_value_heads=num_key_value_heads,
                ),
            )
        )
        assert not [k for k, v in unsupported.items() if v is not None], unsupported
        assert input_layout == "BNSD" and query.dim() == 4 and query.shape[2] == 1 and query.shape[1] == num_heads
        assert query.dtype in (torch.float16, torch.bfloat16)
        batch, _, _, head_dim = query.shape
        kv_heads = num_key_value_heads or num_heads
        assert num_heads % kv_heads == 0 and num_heads // kv_heads <= 64
        # PageAttention: cache (blocknum, blocksize, H), block_size a multiple of 32 for int8
        assert key.dtype == torch.int8 and key.shape == value.shape and key.dim() == 3
        assert key.shape[1] == block_size and block_size % 32 == 0 and key.shape[2] == kv_heads * head_dim
        assert block_table.dtype == torch.int32 and block_table.shape[0] == batch
        assert isinstance(actual_seq_lengths_kv, list) and len(actual_seq_lengths_kv) == batch
        assert key_antiquant_mode == 0 and value_antiquant_mode == 0  # per channel
        for t in (key_antiquant_scale, key_antiquant_offset, value_antiquant_scale, value_antiquant_offset):
            assert t.dtype == query.dtype and t.shape in {
                (1, kv_heads, 1, head_dim),
                (1, kv_heads, head_dim),
                (1, kv_heads * head_dim),
            }
        k_scale = key_antiquant_scale.float().reshape(kv_heads, head_dim)
        k_offset = key_antiquant_offset.float().reshape(kv_heads, head_dim)
        v_scale = value_antiquant_scale.float().reshape(kv_heads, head_dim)
        v_offset = value_antiquant_offset.float().reshape(kv_heads, head_dim)
        out = torch.empty_like(query)
        group = num_heads // kv_heads
        for b, n in enumerate(actual_seq_lengths_kv):
            assert block_table.shape[1] * block_size >= n
            blocks = block_table[b, : -(-n // block_size)].long()
            k = key[blocks].reshape(-1, kv_heads, head_dim)[:n].float()
            v = value[blocks].reshape(-1, kv_heads, head_dim)[:n].float()
            k = ((k + k_offset) * k_scale).repeat_interleave(group, dim=1)
            v = ((v + v_offset) * v_scale).repeat_interleave(group, dim=1)
            probs = (torch.einsum("hd,khd->hk", query[b, :, 0].float(), k) * scale).softmax(-1)
            out[b, :, 0] = torch.einsum("hk,khd->hd", probs, v).to(query.dtype)
        return out, torch.zeros(1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size, kv_heads, lens", [(32, 2, [1, 100, 33]), (64, 1, [300]), (128, 4, [129, 7])])
def test_decode_lowering_matches_reference(dtype, block_size, kv_heads, lens):
    case = make_case(sum(lens), lens, kv_heads * 4, kv_heads, 128, block_size, dtype)
    npu = EmulatedTorchNpu()
    out = ascend.paged_attention_int8(npu, **case)
    exact = paged_attention_int8_reference(**{**case, "query": case["query"].double()})
    assert out.dtype == dtype and out.shape == case["query"].shape
    # antiquant parameters travel in the query's dtype: bfloat16 scales cost some accuracy
    assert rel_err(out, exact) <= 1e-2


def test_offsets_are_passed_negated():
    case = make_case(1, [70, 20])
    npu = EmulatedTorchNpu()
    out = ascend.paged_attention_int8(npu, **case)
    ((_, kwargs),) = [c for c in npu.calls if c[0] == "npu_fused_infer_attention_score"]
    assert torch.equal(kwargs["key_antiquant_offset"].float().reshape(2, 128), -case["k_offset"])
    assert torch.equal(kwargs["value_antiquant_offset"].float().reshape(2, 128), -case["v_offset"])
    # With our offsets passed as they are, Ascend's (x + offset) * scale gives a different answer.
    wrong = ascend.paged_attention_int8(npu, **{**case, "k_offset": -case["k_offset"], "v_offset": -case["v_offset"]})
    exact = paged_attention_int8_reference(**{**case, "query": case["query"].double()})
    assert rel_err(out, exact) <= 1e-2 < rel_err(wrong, exact)


def test_cache_write_lowering_equals_the_cpu_write_op():
    torch.manual_seed(2)
    key = torch.randn(40, 2, 128) * 2
    value = torch.randn(40, 2, 128)
    scales = dict(
        k_scale=torch.rand(2, 128) * 0.03 + 0.01,
        k_offset=torch.randint(-20, 20, (2, 128)).float(),
        v_scale=torch.rand(2, 128) * 0.03 + 0.01,
        v_offset=torch.randint(-20, 20, (2, 128)).float(),
    )
    slots = torch.randperm(5 * 32)[:40]
    slots[[3, 17]] = -1
    expected = [torch.full((5, 32, 2, 128), 7, dtype=torch.int8) for _ in range(2)]
    lowered = [c.clone() for c in expected]
    reshape_and_cache_int8(key, value, *expected, slots, **scales)
    npu = EmulatedTorchNpu()
    ascend.reshape_and_cache_int8(npu, key, value, *lowered, slots, **scales)
    assert torch.equal(lowered[0], expected[0]) and torch.equal(lowered[1], expected[1])
    ((_, kwargs),) = [c for c in npu.calls if c[0] == "npu_scatter_pa_kv_cache"]
    assert kwargs["slot_mapping"].shape == (38,) and kwargs["slot_mapping"].dtype == torch.int32


def test_prefill_lowers_to_decode_rows():
    case = make_case(3, [50, 90], num_heads=4, kv_heads=2, head_dim=64, block_size=32)
    query = torch.randn(7, 4, 64).half()
    query_start_loc = torch.tensor([0, 3, 7], dtype=torch.int32)
    rows, row_lens = prefill_rows(case["block_tables"], case["context_lens"], query_start_loc)
    out = ascend.paged_attention_int8(
        EmulatedTorchNpu(), **{**case, "query": query, "block_tables": rows, "context_lens": row_lens}
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


def test_block_size_not_a_multiple_of_32_is_refused():
    case = make_case(4, [20], block_size=16)
    with pytest.raises(QpassError, match="multiple of 32"):
        ascend.paged_attention_int8(EmulatedTorchNpu(), **case)
    with pytest.raises(QpassError, match="multiple of 32"):
        ascend.reshape_and_cache_int8(
            EmulatedTorchNpu(),
            torch.randn(1, 2, 128),
            torch.randn(1, 2, 128),
            case["key_cache"],
            case["value_cache"],
            torch.tensor([0]),
            case["k_scale"],
            case["k_offset"],
            case["v_scale"],
            case["v_offset"],
        )


def test_float32_query_is_refused():
    case = make_case(5, [20], dtype=torch.float32)
    with pytest.raises(QpassError, match="float16 or bfloat16"):
        ascend.paged_attention_int8(EmulatedTorchNpu(), **case)
