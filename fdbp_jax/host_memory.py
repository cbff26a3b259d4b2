"""glibc's malloc set to keep the memory it frees, for XLA:CPU. Every execution of a compiled step
allocates its temporaries afresh; by default glibc serves large blocks with new mmaps and trims the
per-thread arenas, so each step touches fresh pages and pays a kernel page fault per 4 KiB: ~74k faults
and ~90 ms of kernel time per ResNet-20 BP step at batch 128 on one core, 15 % of the step (measured,
docs/performance.md). One arena that neither maps nor trims serves every step from pages it already
holds (peak memory ~9 % higher in that measurement). That pays only with one CPU device per process:
several simulated devices in one process contend for the one arena (the 8-device mesh on 2 cores ran
~1.4x slower, and without the arena limit no faster), and on an accelerator the step's buffers are not
host memory. A process of several CPU devices instead has malloc back its blocks with transparent huge
pages (glibc's `glibc.malloc.hugetlb=1`), which takes its faults from one per 4 KiB to one per 2 MiB: the
8-device mesh's ResNet-20 steps went from 76-108k faults to 3-5k, BP 9 % faster and FDBP 16 %
(docs/performance.md). glibc reads that setting only when a process starts, so the program restarts
itself with it (`restart_with_huge_pages`)."""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import sys
from typing import Mapping

# glibc's mallopt options (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
NEVER_TRIM = 2**31 - 1  # the largest threshold mallopt takes (bytes of free memory at the top of the heap)
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"  # glibc >= 2.35: madvise(MADV_HUGEPAGE) on what malloc maps
TRANSPARENT_HUGE_PAGES = "/sys/kernel/mm/transparent_hugepage/enabled"  # Linux: "always [madvise] never"


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


def huge_pages_available() -> bool:
    """Whether malloc can be given transparent huge pages here: glibc 2.35 or later, and a Linux kernel
    whose transparent huge pages are not turned off ("[never]")."""
    library, version = platform.libc_ver()
    if library != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
        return False
    try:
        with open(TRANSPARENT_HUGE_PAGES) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def huge_pages_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with `HUGE_PAGES_TUNABLE` added to GLIBC_TUNABLES (the other tunables kept): for a
    process to start with it."""
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    if HUGE_PAGES_TUNABLE not in tunables:
        tunables.append(HUGE_PAGES_TUNABLE)
    return {**environ, "GLIBC_TUNABLES": ":".join(tunables)}


def has_huge_pages() -> bool:
    """Whether this process started with malloc's transparent huge pages (`HUGE_PAGES_TUNABLE`)."""
    return HUGE_PAGES_TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":")


def restart_with_huge_pages() -> None:
    """Re-execute this program, with the same interpreter arguments, under `huge_pages_environment`,
    unless it already runs so or huge pages are not available; call it first thing in a program (it
    replaces the process: nothing it did so far survives)."""
    if has_huge_pages() or not huge_pages_available():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], huge_pages_environment(os.environ))


def uses_huge_pages_by_default(devices_per_process: int) -> bool:
    """Whether a process with this many devices gains by huge pages: several CPU devices (above)."""
    return devices_per_process > 1 and cpu_only() and huge_pages_available()
