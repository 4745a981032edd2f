"""Random paged int8 attention inputs shared by the Triton and Ascend tests."""

import math

import torch


def make_case(seed, context_lens, num_heads=8, kv_heads=2, head_dim=128, block_size=32, dtype=torch.float16):
    """Random int8 paged cache with out-of-order blocks, holes, and table padding that points at a
    real block of other data (so an over-read changes the result)."""
    g = torch.Generator().manual_seed(seed)
    needed = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(needed) + 2
    shape = (num_blocks, block_size, kv_heads, head_dim)
    perm = torch.randperm(num_blocks, generator=g)
    block_tables = torch.full((len(context_lens), max(needed) + 1), int(perm[-1]), dtype=torch.int32)
    at = 0
    for i, n in enumerate(needed):
        block_tables[i, :n] = perm[at : at + n]
        at += n
    return dict(
        query=torch.randn(len(context_lens), num_heads, head_dim, generator=g).to(dtype),
        key_cache=torch.randint(-128, 128, shape, generator=g, dtype=torch.int8),
        value_cache=torch.randint(-128, 128, shape, generator=g, dtype=torch.int8),
        block_tables=block_tables,
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        k_scale=torch.rand(kv_heads, head_dim, generator=g) * 0.03 + 0.005,
        k_offset=torch.randint(-40, 40, (kv_heads, head_dim), generator=g).float(),
        v_scale=torch.rand(kv_heads, head_dim, generator=g) * 0.03 + 0.005,
        v_offset=torch.randint(-40, 40, (kv_heads, head_dim), generator=g).float(),
        softmax_scale=1 / math.sqrt(head_dim),
    )


def rel_err(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def make_dynamic_case(seed, context_lens, num_heads=8, kv_heads=2, head_dim=128, block_size=32, dtype=torch.float16):
    """:func:`make_case`'s cache as the dynamic cache: a random float32 scale and integer offset per slot and kv
    head (``[num_blocks, block_size, kv_heads, 2]``, every slot, unused ones too) in place of the per-channel ones."""
    case = make_case(seed, context_lens, num_heads, kv_heads, head_dim, block_size, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    shape = case["key_cache"].shape[:3]
    for name in ("k_scale", "k_offset", "v_scale", "v_offset"):
        del case[name]
    scales = [torch.rand(shape, generator=g) * 0.05 + 0.002 for _ in range(2)]
    for name, scale in zip(("k_scale_cache", "v_scale_cache"), scales):
        case[name] = torch.stack([scale, torch.randint(-40, 40, shape, generator=g).float()], dim=-1)
    return case


def fused_decoder(reference, fused_op, max_context=128):
    """Stage 1 of the lowering on ``reference``'s unlifted decoder (two attention layers): one ``fused_op`` per
    site, computing what the Q/DQ program computes on 37 tokens. Returns the fused ``GraphModule``, ready for
    ``LowerPagedAttentionPass``."""
    from qpass.frontends.torch_export.pipeline import unlift_decoder
    from qpass.passes.fx.find_attention_sites import find_attention_sites
    from qpass.passes.fx.fuse_quantized_attention import FuseQuantizedAttentionPass

    gm = unlift_decoder(reference)
    fuse = FuseQuantizedAttentionPass(find_attention_sites(gm.graph), max_context)
    assert fuse(gm).modified and fuse.count == 2
    assert len(gm.graph.find_nodes(op="call_function", target=fused_op)) == 2
    ids = torch.randint(0, 256, (1, 37))
    with torch.no_grad():
        expected = reference.module()(ids, torch.arange(37)[None])
        assert (gm(ids, torch.arange(37)[None]) - expected).abs().max().item() < 1e-4
    return gm
