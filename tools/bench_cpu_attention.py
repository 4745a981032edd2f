"""One layer's decode attention on the CPU: qpass's C++ kernel over its int8 pages against vLLM's own CPU attention
kernel over a bfloat16 cache, same shapes, in one process (issue 25: where the decode time goes).

SmolLM2-135M's attention (9 query heads over 3 KV heads of 64), every request ``--context`` tokens in blocks of 32,
bfloat16 queries; for each batch size and thread count, the median of ``--repeats`` timings of each kernel, taken in
turns, and the ratio. Also one decode step's cache write (qpass's C++ write against vLLM's
``cpu_attn_reshape_and_cache``).
Runs in vLLM's environment:

    .venv-vllm/bin/python -m tools.bench_cpu_attention [--batches 1 8 32] [--context 2048] [--threads 1 2]
"""

import statistics
import time

import torch

from tools import common


def timed(fn, repeats: int, inner: int) -> float:
    """Milliseconds per call: the median over ``repeats`` of ``inner`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = common.parser(__doc__, "tools.bench_cpu_attention")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    import vllm._custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from qpass.runtime import cpu_kernel
    from qpass.vllm.int8_layer import content_bytes, split_cache

    if not cpu_kernel.available():
        raise SystemExit("qpass's CPU kernel did not build here; see the warning above")
    heads, kv_heads, dim, block = 9, 3, 64, 32
    isa = _get_attn_isa(torch.bfloat16, block, dim)
    g = torch.Generator().manual_seed(0)
    print(f"vLLM's CPU attention ISA: {isa}; context {args.context}; ms per layer, median of {args.repeats}")
    print("| threads | batch | vLLM bfloat16 attention | qpass int8 attention | ratio | vLLM write | qpass write |")
    print("|---|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batches:
            blocks = -(-args.context // block)
            n = torch.full((batch,), args.context, dtype=torch.int32)
            table = torch.randperm(batch * blocks, generator=g).view(batch, blocks).to(torch.int32)
            query = (torch.randn(batch, heads, dim, generator=g) * 0.3).bfloat16()
            new = (torch.randn(batch, kv_heads, dim, generator=g)).bfloat16()
            slots = (table[:, -1].long() * block + (args.context - 1) % block).contiguous()
            # vLLM: [blocks, kv_heads, 2 * block, dim] bfloat16, K then V per block
            pages = torch.randn(batch * blocks, kv_heads, 2 * block, dim, generator=g).bfloat16()
            k_pages, v_pages = pages.chunk(2, dim=2)
            starts = torch.arange(batch + 1, dtype=torch.int32)
            meta = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=batch, num_heads=heads, num_kv_heads=kv_heads, head_dim=dim, seq_lens=n,
                dtype=torch.bfloat16, query_start_loc=starts, causal=True, sliding_window_size=-1, isa=isa,
                enable_kv_split=False, dynamic_causal=None, kv_cache_dtype="auto",
            )  # fmt: skip
            out = torch.empty_like(query)

            def vllm_attention():
                ops.cpu_attention_with_kv_cache(
                    query=query, key_cache=k_pages, value_cache=v_pages, output=out, query_start_loc=starts,
                    seq_lens=n, scale=dim**-0.5, causal=True, alibi_slopes=None, sliding_window=-1,
                    block_table=table, softcap=0, scheduler_metadata=meta, s_aux=None, dynamic_causal=None,
                    k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
                )  # fmt: skip

            def vllm_write():
                ops.cpu_attn_reshape_and_cache(new, new, k_pages, v_pages, slots, isa)

            # qpass: its int8 pages, [blocks, kv_heads, block, 2 * dim], through the views its backend uses
            int8_pages = torch.randint(-128, 128, (batch * blocks, kv_heads, block, content_bytes(dim, False)),
                                       generator=g, dtype=torch.int8)  # fmt: skip
            (keys, values), _ = split_cache(int8_pages)
            grid = [torch.rand(kv_heads, dim, generator=g) * 0.05 + 0.01, torch.zeros(kv_heads, dim)]
            static = (grid[0], grid[0], grid[1])

            def qpass_attention():
                cpu_kernel.paged_decode(query, keys, values, table, n, dim**-0.5, static)

            def qpass_write():
                cpu_kernel.write(new, new, keys, values, slots, (grid, grid))

            fns = {"va": vllm_attention, "qa": qpass_attention, "vw": vllm_write, "qw": qpass_write}
            for fn in fns.values():
                fn()
            inner = max(1, 200 // batch)
            ms = {k: [] for k in fns}
            for _ in range(args.repeats):  # in turns, so that a noisy neighbour weighs on both
                for k, fn in fns.items():
                    ms[k].append(timed(fn, 1, inner))
            med = {k: statistics.median(v) for k, v in ms.items()}
            print(
                f"| {threads} | {batch} | {med['va']:.3f} | {med['qa']:.3f} | {med['va'] / med['qa']:.2f} "
                f"| {med['vw'] * 1e3:.0f} us | {med['qw'] * 1e3:.0f} us |"
            )


if __name__ == "__main__":
    main()
