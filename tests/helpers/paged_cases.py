"""Random paged int8 attention inputs shared by the Triton and Ascend tests, and the tiny decoders, recipes and
prefill run shared by the tests of the paged lowering."""

import math

import torch

MODES = {
    "kv-int8": dict(kv_cache="static"),
    "fa-quant": dict(fa_quant=True),
    "both": dict(fa_quant=True, kv_cache="static"),
}


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


def tiny(arch: str, num_layers: int = 2, **kwargs) -> torch.nn.Module:
    """A tiny random model with head_dim 64 (the paged ops' smallest) and weights large enough that greedy
    decoding does not collapse into one repeated token, which would make a token match say little."""
    from qpass.models.tiny import tiny_model

    model = tiny_model(arch, num_layers=num_layers, hidden_size=256, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    return model


def recipe_for(model, mode: str, vocab: int = 256):
    from tests.helpers.frontend_cases import calibrated

    return calibrated(model, torch.randint(0, vocab, (4, 32)), observer="minmax", **MODES[mode])[1]


def prefill(lowered, ids: torch.Tensor, block_size: int = 16):
    """Logits of the lowered program for one prompt, and its caches (each layer's int8 caches, then for the
    dynamic cache their scale caches)."""
    from qpass.frontends.torch_export.decoder import decoder_layout
    from qpass.frontends.torch_export.pipeline import layer_caches
    from qpass.runtime.paged_cache import BlockAllocator, BlockTables

    layout = decoder_layout(lowered)
    num_blocks = -(-ids.shape[1] // block_size) + 1
    dynamic = layout["kv_cache"] == "dynamic"
    caches = [
        layer_caches(num_blocks, block_size, layout["num_kv_heads"], layout["head_dim"], dynamic)
        for _ in range(layout["num_layers"])
    ]
    tables = BlockTables(BlockAllocator(num_blocks), block_size)
    slots = tables.append_tokens(0, ids.shape[1])
    block_tables, context_lens = tables.tensors([0])
    args = (
        ids,
        torch.arange(ids.shape[1])[None],
        *(t for c in caches for t in c),
        block_tables,
        context_lens,
        slots,
        torch.tensor([0, ids.shape[1]], dtype=torch.int32),
    )
    with torch.no_grad():
        return lowered.module()(*args), caches


def run_interpreted(test_file: str, *pytest_args: str, timeout: int = 600):
    """``pytest test_file`` again in a fresh process with ``TRITON_INTERPRET=1`` (which must be set before triton is
    first imported) and ``QPASS_TRITON_INTERPRET_CHILD=1``, so that the file's interpreter tests run there; the
    finished process (``returncode``, ``stdout``, ``stderr``)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1", "QPASS_TRITON_INTERPRET_CHILD": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider", *pytest_args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
