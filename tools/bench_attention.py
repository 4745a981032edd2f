"""Benchmark the int8 paged decode kernel against a float16 paged kernel of the same design (and
FlashInfer's float16 paged decode when it is installed), with KV-cache bytes per token.

    python -m tools.bench_attention                      # the default grid, on the current GPU
    python -m tools.bench_attention --grid 8x32768 --peak-tbps 3.35

Without CUDA it says so, prints the bytes-per-token figures and runs a tiny correctness check of
the kernels in Triton's interpreter.
"""

import argparse
import math
import os
import sys

from tools import common

# GPU name fragments -> peak memory bandwidth in TB/s (vendor data sheets); first match wins.
PEAK_TBPS = [
    (("H200",), 4.8),
    (("H100", "NVL"), 3.9),
    (("H100", "PCIe"), 2.0),
    (("H100",), 3.35),  # SXM (HBM3)
    (("A100", "80GB"), 2.039),
    (("A100",), 1.555),
    (("L40S",), 0.864),
]


def fail(message):
    """A command-line error: one line, exit status 2."""
    print(f"bench_attention: {message}", file=sys.stderr)
    sys.exit(2)


def parse_grid(text):
    try:
        return [tuple(int(x) for x in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        fail(f"--grid {text!r} is not a list like 1x131072,8x32768 (batch x context)")


def bytes_per_token(kv_heads, head_dim, tokens):
    """KV-cache bytes per token per layer: int8 codes plus the four float32 ``[kv_heads, head_dim]``
    C8 tensors amortized over ``tokens`` cached tokens, against float16."""
    int8 = 2 * kv_heads * head_dim + 4 * kv_heads * head_dim * 4 / tokens
    fp16 = 2 * kv_heads * head_dim * 2
    return int8, fp16


def peak_tbps(name, override):
    if override:
        return override
    for fragments, tbps in PEAK_TBPS:
        if all(f in name for f in fragments):
            return tbps
    fail(f"no peak bandwidth known for {name!r}; pass --peak-tbps")


def make_inputs(batch, context, args, device):
    """Random paged caches (int8 and float16) with shuffled block tables."""
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    blocks_per_seq = -(-context // args.block_size)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, args.block_size, args.kv_heads, args.head_dim)
    key_cache = torch.randint(-128, 128, shape, generator=g, dtype=torch.int8, device=device)
    value_cache = torch.randint(-128, 128, shape, generator=g, dtype=torch.int8, device=device)
    block_tables = torch.randperm(num_blocks, generator=g, device=device).view(batch, blocks_per_seq).int()
    scales = [torch.rand(args.kv_heads, args.head_dim, generator=g, device=device) * 0.03 + 0.005 for _ in range(4)]
    return dict(
        query=torch.randn(batch, args.num_heads, args.head_dim, generator=g, device=device).half(),
        key_cache=key_cache,
        value_cache=value_cache,
        block_tables=block_tables,
        context_lens=torch.full((batch,), context, dtype=torch.int32, device=device),
        k_scale=scales[0],
        k_offset=scales[1].round(),
        v_scale=scales[2],
        v_offset=scales[3].round(),
    )


def time_ms(fn, warmup, repeats):
    """Milliseconds per call of ``fn`` on the GPU (CUDA events), after ``warmup`` calls."""
    import torch

    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def flashinfer_decode(inputs, k16, v16, args):
    """FlashInfer's float16 paged decode over the same block tables, or None if not installed."""
    try:
        import flashinfer
    except ImportError:
        return None
    import torch

    batch, blocks_per_seq = inputs["block_tables"].shape
    context = int(inputs["context_lens"][0])
    device = inputs["query"].device
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=device), "NHD"
    )
    indptr = torch.arange(0, batch + 1, dtype=torch.int32, device=device) * blocks_per_seq
    last_page_len = torch.full(
        (batch,), context - (blocks_per_seq - 1) * args.block_size, dtype=torch.int32, device=device
    )
    wrapper.plan(
        indptr,
        inputs["block_tables"].flatten(),
        last_page_len,
        args.num_heads,
        args.kv_heads,
        args.head_dim,
        args.block_size,
        q_data_type=torch.float16,
        kv_data_type=torch.float16,
    )
    return lambda: wrapper.run(inputs["query"], (k16, v16))


def correctness_check(tpa, device):
    """A small case of the int8 kernel against the dequantizing reference (float16 query)."""
    import torch

    from qpass.runtime.paged_attention import paged_attention_int8_reference

    small = argparse.Namespace(block_size=16, kv_heads=2, head_dim=128, num_heads=8)
    inputs = make_inputs(3, 700, small, device)
    inputs["context_lens"] = torch.tensor([700, 1, 333], dtype=torch.int32, device=device)
    out = tpa.paged_attention_triton(**inputs, softmax_scale=1 / math.sqrt(128))
    cpu = {k: v.cpu() for k, v in inputs.items()}
    ref = paged_attention_int8_reference(**{**cpu, "query": cpu["query"].double()}, softmax_scale=1 / math.sqrt(128))
    err = ((out.cpu().double() - ref).abs().max() / ref.abs().max()).item()
    print(f"correctness: int8 kernel vs reference, relative error {err:.2e} ({'ok' if err <= 1e-2 else 'FAILED'})")
    return err <= 1e-2


def main(argv=None):
    parser = common.parser(__doc__, __spec__.name)
    parser.add_argument("--grid", default="1x131072,8x32768,64x8192,256x2048", help="batch x context, comma separated")
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--peak-tbps", type=float, default=None, help="GPU peak memory bandwidth (TB/s)")
    args = parser.parse_args(argv)
    grid = parse_grid(args.grid)

    print(f"KV-cache bytes per token per layer (kv_heads={args.kv_heads}, head_dim={args.head_dim}):")
    worst = 0.0
    for batch, context in grid:
        int8, fp16 = bytes_per_token(args.kv_heads, args.head_dim, batch * context)
        worst = max(worst, int8 / fp16)
        print(f"  {batch:>4} x {context:<7} int8 {int8:8.2f} B  float16 {fp16:6.0f} B  ratio {int8 / fp16:.4f}")
    print(f"worst int8/float16 ratio {worst:.4f} ({'<=' if worst <= 0.51 else 'ABOVE'} 0.51)")
    if worst > 0.51:
        fail("the int8 cache is above 0.51 of float16 bytes per token; benchmark more cached tokens")

    import torch

    if not torch.cuda.is_available():
        print("CUDA is not available: no timings. Checking the kernels in Triton's interpreter instead.")
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        import qpass.runtime.triton_paged_attention as tpa

        return 0 if correctness_check(tpa, "cpu") else 1

    import qpass.runtime.triton_paged_attention as tpa

    name = torch.cuda.get_device_name()
    peak = peak_tbps(name, args.peak_tbps)
    print(f"device {name}, peak {peak} TB/s")
    if not correctness_check(tpa, "cuda"):
        return 1
    scale = 1 / math.sqrt(args.head_dim)
    print(
        f"{'batch x context':>16} {'int8 ms':>9} {'fp16 ms':>9} {'speedup':>8} {'int8 BW':>8} {'fp16 BW':>8} "
        f"{'flashinfer ms':>14}"
    )
    for batch, context in grid:
        print(_row(tpa, batch, context, args, scale, peak))
        torch.cuda.empty_cache()  # the row's caches are gone with its frame
    return 0


def _row(tpa, batch: int, context: int, args, scale: float, peak: float) -> str:
    """One line of the GPU table: the int8 kernel, the same kernel on a float16 cache, FlashInfer."""
    inputs = make_inputs(batch, context, args, "cuda")
    k16 = ((inputs["key_cache"].float() - inputs["k_offset"]) * inputs["k_scale"]).half()
    v16 = ((inputs["value_cache"].float() - inputs["v_offset"]) * inputs["v_scale"]).half()
    int8_ms = time_ms(
        lambda: tpa.paged_attention_triton(**inputs, softmax_scale=scale, max_context_len=context),
        args.warmup,
        args.repeats,
    )
    fp16_ms = time_ms(
        lambda: tpa.paged_attention_triton(
            inputs["query"],
            k16,
            v16,
            inputs["block_tables"],
            inputs["context_lens"],
            softmax_scale=scale,
            max_context_len=context,
        ),
        args.warmup,
        args.repeats,
    )
    tokens = batch * context
    int8_bytes = tokens * bytes_per_token(args.kv_heads, args.head_dim, tokens)[0]
    fp16_bytes = tokens * bytes_per_token(args.kv_heads, args.head_dim, tokens)[1]
    try:
        fi = flashinfer_decode(inputs, k16, v16, args)
        fi_text = "not installed" if fi is None else f"{time_ms(fi, args.warmup, args.repeats):.3f}"
    except Exception as e:  # an API that moved between FlashInfer versions should not stop the run
        fi_text = f"failed: {type(e).__name__}"
    return (
        f"{batch:>6} x {context:<7} {int8_ms:9.3f} {fp16_ms:9.3f} {fp16_ms / int8_ms:7.2f}x "
        f"{int8_bytes / int8_ms / 1e9 / peak:7.1%} {fp16_bytes / fp16_ms / 1e9 / peak:7.1%} {fi_text:>14}"
    )


if __name__ == "__main__":
    sys.exit(main())
