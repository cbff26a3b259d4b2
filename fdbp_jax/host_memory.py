"""glibc's malloc set to keep the memory it frees, for XLA:CPU. Every execution of a compiled step
allocates its temporaries afresh; by default glibc serves large blocks with new mmaps and trims the
per-thread arenas, so each step touches fresh pages and pays a kernel page fault per 4 KiB: ~74k faults
and ~90 ms of kernel time per ResNet-20 BP step at batch 128 on one core, 15 % of the step (measured,
docs/performance.md). One arena that neither maps nor trims serves every step from pages it already
holds (peak memory ~9 % higher in that measurement). That pays only with one CPU device per process:
several simulated devices in one process contend for the one arena (the 8-device mesh on 2 cores ran
~1.4x slower, and without the arena limit no faster), and on an accelerator the step's buffers are not
host memory.

A process of several CPU devices instead starts with `MESH_TUNABLES` and `MESH_XLA_FLAGS`
(`mesh_environment`): malloc backs its blocks with transparent huge pages (one fault per 2 MiB, not per
4 KiB), keeps them in its per-thread arenas (no mmaps, no trimming, a 64 MiB pad that keeps a freed
heap from being unmapped), and XLA:CPU schedules each step for memory rather than for concurrency
within a device. A per-thread arena's heap holds at most 64 MiB, and glibc maps a larger block afresh
whatever its settings; that scheduling brought FDBP's ResNet-20 temporaries from 65.7 to 60.8 MiB a
device, so its steps stopped faulting (3279 faults a step to 0) and the mesh ran ~10 % faster for BP and
FDBP alike (docs/performance.md). glibc and XLA read these settings only when a process starts, so the
program restarts itself with them (`restart_with_mesh_environment`)."""

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
# a process of several CPU devices (glibc >= 2.35 for hugetlb=1: madvise(MADV_HUGEPAGE) on what malloc maps)
MESH_TUNABLES = ("glibc.malloc.hugetlb=1", "glibc.malloc.mmap_max=0", f"glibc.malloc.trim_threshold={NEVER_TRIM}",
                 f"glibc.malloc.top_pad={64 * 2**20}")
MESH_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)
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


def mesh_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with `MESH_TUNABLES` added to GLIBC_TUNABLES and `MESH_XLA_FLAGS` to XLA_FLAGS, each
    unless it already sets that name (what the caller set wins): for a process of several CPU devices."""
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    flags = environ.get("XLA_FLAGS", "").split()
    return {**environ, "GLIBC_TUNABLES": ":".join(tunables + _not_yet_set(MESH_TUNABLES, tunables)),
            "XLA_FLAGS": " ".join(flags + _not_yet_set(MESH_XLA_FLAGS, flags))}


def _not_yet_set(settings: tuple, present: list) -> list:
    """The "name=value" `settings` whose names `present` does not set."""
    names = {setting.split("=")[0] for setting in present}
    return [setting for setting in settings if setting.split("=")[0] not in names]


def has_mesh_environment() -> bool:
    """Whether this process started with `mesh_environment` (its settings' names all set)."""
    return mesh_environment(os.environ) == {**os.environ}


def restart_with_mesh_environment() -> None:
    """Re-execute this program, with the same interpreter arguments, under `mesh_environment`, unless it
    already runs so or huge pages are not available; call it first thing in a program (it replaces the
    process: nothing it did so far survives)."""
    if has_mesh_environment() or not huge_pages_available():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], mesh_environment(os.environ))


def uses_mesh_environment_by_default(devices_per_process: int) -> bool:
    """Whether a process with this many devices gains by `mesh_environment`: several CPU devices (above)."""
    return devices_per_process > 1 and cpu_only() and huge_pages_available()
