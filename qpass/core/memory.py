"""The memory available, and giving freed memory back to the system between the layers of a layer-at-a-time run."""

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
