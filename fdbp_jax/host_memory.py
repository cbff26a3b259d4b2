"""glibc's malloc set to keep the memory it frees, for XLA:CPU. Every execution of a compiled step
allocates its temporaries afresh; by default glibc serves large blocks with new mmaps and trims the
per-thread arenas, so each step touches fresh pages and pays a kernel page fault per 4 KiB: ~74k faults
and ~90 ms of kernel time per ResNet-20 BP step at batch 128 on one core, 15 % of the step (measured,
docs/performance.md). One arena that neither maps nor trims serves every step from pages it already
holds (peak memory ~9 % higher in that measurement). That pays only with one CPU device per process:
several simulated devices in one process contend for the one arena (the 8-device mesh on 2 cores ran
~1.4x slower, and without the arena limit no faster), and on an accelerator the step's buffers are not
host memory."""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os

# glibc's mallopt options (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
NEVER_TRIM = 2**31 - 1  # the largest threshold mallopt takes (bytes of free memory at the top of the heap)


def keep_freed_memory() -> bool:
    """Make this process's malloc reuse what it frees: one arena, no mmapped blocks, no trimming.
    Call it at process start, before JAX starts its backend (threads choose their arena when they
    first allocate). Returns whether glibc took all three settings (False, changing nothing, where the C
    library has no mallopt)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all([mallopt(option, value) == 1 for option, value in
                ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER_TRIM))])


def cpu_only() -> bool:
    """Whether JAX will run on its CPU backend, decided without starting it: JAX_PLATFORMS says cpu, or no
    accelerator is installed (no PJRT plugin under `jax_plugins`, by module or entry point, and no libtpu)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    plugins = (importlib.util.find_spec("jax_plugins") is not None
               or bool(importlib.metadata.entry_points(group="jax_plugins")))
    return not plugins and importlib.util.find_spec("libtpu") is None


def keeps_freed_memory_by_default(devices_per_process: int) -> bool:
    """Whether a process with this many devices gains by `keep_freed_memory`: one CPU device only (above)."""
    return devices_per_process == 1 and cpu_only()
