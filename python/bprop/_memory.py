"""How much memory this process can still take, and the check that refuses an
allocation the machine cannot hold before anything is allocated.

The core zero-fills what it allocates, so on Linux (which overcommits) an
allocation larger than the machine does not fail cleanly: the pages are touched
one by one until the out-of-memory killer ends the process. Sizes are therefore
checked here first, against what the kernel reports as available.
"""

from __future__ import annotations

import os
from typing import Optional


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _cgroup_headroom() -> Optional[int]:
    """What the process's cgroup (a container's memory limit) still allows."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:
            return max(0, limit - usage)
    return None


def available_memory() -> Optional[int]:
    """Bytes this process can still allocate without swapping or being killed:
    the smaller of the kernel's MemAvailable and the cgroup's headroom (None where
    neither can be read)."""
    known = [n for n in (_meminfo_available(), _cgroup_headroom()) if n is not None]
    return min(known) if known else None


def format_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def check_fits_in_memory(where: str, what: str, nbytes: int) -> None:
    """Raises MemoryError, before anything is allocated, if `nbytes` exceed the
    memory available; `what` says what needs them (layer, shape)."""
    available = available_memory()
    if available is not None and nbytes > available:
        raise MemoryError(f"[{where}] {what} would take {format_bytes(nbytes)} ({nbytes:,} bytes), "
                          f"but this machine has {format_bytes(available)} available; nothing "
                          "was allocated")
