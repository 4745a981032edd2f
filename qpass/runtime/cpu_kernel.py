"""qpass's C++ attention kernel for the CPU (``csrc/paged_int8.cpp``): one call attends a batch of query rows,
each over its own context in the paged int8 cache (a decode's token, or a prefill's tokens each with its causal
context), static or dynamic, reading the int8 codes in place (the folding of ``paged_attention.py``) on ATen's thread
pool. The folded PyTorch path it replaces loops over the requests in Python and materialises every score, which costs
more than the attention itself once a batch decodes; the kernel is what lets vLLM's scheduler batch qpass's int8
cache at the bfloat16 cache's speed.

It is compiled on first use with torch's C++ extension builder (``-O3 -march=native``; a C++ compiler and ninja, which
vLLM's CPU build also needs), cached per user in torch's extension directory (``TORCH_EXTENSIONS_DIR``), named after
the CPU capability and the Python environment so that one cache serves machines of different instruction sets and
several environments. Where it cannot be built, or with ``QPASS_CPU_KERNEL=0``,
:func:`available` is False and the ops keep the folded PyTorch path, with one warning saying why.
"""

import functools
import hashlib
import logging
import os
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "paged_int8.cpp"
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fno-math-errno"]


@functools.cache
def available() -> bool:
    """Whether the kernel is built and loaded (building it on the first call)."""
    if os.environ.get("QPASS_CPU_KERNEL", "1") == "0":
        return False
    from torch.utils import cpp_extension

    # One build per CPU capability and per Python environment: torch's builder keys its cache directory by name
    # alone, and two environments sharing a name would rebuild it for each other in turn.
    where = hashlib.sha256(sys.prefix.encode()).hexdigest()[:8]
    name = f"qpass_paged_int8_{torch.backends.cpu.get_cpu_capability().lower()}_{where}"
    try:
        cpp_extension.load(
            name=name, sources=[str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], is_python_module=False
        )
    except (OSError, RuntimeError, ImportError, cpp_extension.subprocess.CalledProcessError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log.warning("qpass's CPU attention kernel did not build (%s); decoding runs the slower PyTorch path", first)
        return False
    return True


def paged_decode(query, key_cache, value_cache, block_tables, context_lens, softmax_scale, static=None, pairs=None):
    """Attention of one query token per sequence, ``[num_seqs, num_heads, head_dim]`` in the query's dtype (computed in
    float32): ``static`` is the cache's ``(k_scale, v_scale, v_offset)`` per channel (K's offset cancels in the
    softmax), ``pairs`` the dynamic cache's ``(k_scale_cache, v_scale_cache)``; the other arguments as in
    ``qpass::paged_attention_int8``, whose checks the caller has made.
    """
    static = [None] * 3 if static is None else [t.float().contiguous() for t in static]
    pairs = [None] * 2 if pairs is None else pairs
    tables, lens = (t.to(torch.int32).contiguous() for t in (block_tables, context_lens))
    args = (query.contiguous(), key_cache, value_cache, tables, lens, *static, *pairs, float(softmax_scale))
    return torch.ops.qpass_cpu.paged_attention_int8(*args)


def write(key, value, key_cache, value_cache, slots, grids=None, pairs=None) -> None:
    """Quantize ``key`` and ``value`` ``[tokens, kv_heads, head_dim]`` into their ``slots`` (int64, -1 skips) of the
    caches (any strides): on the static ``grids`` ``((k_scale, k_offset), (v_scale, v_offset))`` per channel, or per
    token and kv head with each ``(scale, offset)`` written to ``pairs`` ``(k_scale_cache, v_scale_cache)``; the codes
    of :func:`qpass.core.int8.quantize` and :func:`qpass.core.int8.quantize_dynamic`."""
    grids = [None] * 4 if grids is None else [t.float().contiguous() for grid in grids for t in grid]
    pairs = [None] * 2 if pairs is None else pairs
    x = (key.contiguous(), value.contiguous(), key_cache, value_cache, slots.to(torch.int64).contiguous())
    torch.ops.qpass_cpu.write_int8(*x, *grids, *pairs)
