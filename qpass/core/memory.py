"""The memory available, the share of it that values passed between layers may take, and giving freed memory back
to the system between the layers of a layer-at-a-time run."""

import os
from pathlib import Path


def trim_heap() -> None:
    """Give the memory freed with a layer's weights back to the system (glibc keeps freed blocks below its mmap
    threshold in the heap, and fragments of them add up over the layers: measured 60 MB a layer at hidden 2048)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim this way
        pass


def available_memory() -> int:
    """Bytes of memory available to this process now (``MemAvailable``; the free pages where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def hidden_budget(budget: int | None) -> int:
    """The bytes values passed from layer to layer (hidden states, :class:`qpass.core.spill.Spill`) may take in memory
    before they go to temporary files: ``budget``, by default a quarter of the memory available now."""
    return budget if budget is not None else available_memory() // 4
