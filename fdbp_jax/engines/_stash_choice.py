"""``stash="auto"``: the fastest stash whose rings fit in a device's memory.

The FDBP mesh engine's stash modes, fastest first as measured (docs/performance.md: on 2 real
workers and on the 8-device CPU mesh, in every run): "selective" (saves the conv and matmul outputs,
re-runs the elementwise ops), then "recompute" (saves the input and weights, re-runs the forward; the
least memory, the fallback). "residuals" saves everything but copies more and measured slower than
"selective" everywhere, so auto never picks it. What fits is judged before anything is compiled, from
the stash rings' exact bytes per device (their shapes, traced by `jax.eval_shape`): a mode fits when
its rings take at most `STASH_MEMORY_SHARE` of the device's memory, leaving the rest to the weights,
optimizer state and one tick's temporaries. With several processes a mode is taken only if it fits on
every process, so that all of them build the same rings. No GPU or TPU run has tested the order;
pass a stash by name to override it.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import jax

from fdbp_jax import distributed

AUTO = "auto"
SPEED_ORDER = ("selective", "recompute")  # fastest first; the last is taken whatever it needs
STASH_MEMORY_SHARE = 0.5  # of a device's memory, the most auto lets the stash rings take


def device_memory_bytes(device: jax.Device, local_devices: int) -> int:
    """Bytes one device can hold: its allocator's limit on a GPU or TPU; on CPU, where the devices of
    a process share the host's memory, the host's physical memory split among `local_devices`."""
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // max(local_devices, 1)


def fastest_fitting_stash(stash_bytes: Callable[[str], int], memory_bytes: int,
                          order: Sequence[str] = SPEED_ORDER) -> str:
    """The first mode of `order` whose rings (`stash_bytes(mode)`, per device) take at most
    `STASH_MEMORY_SHARE` of `memory_bytes` on every process; the last mode if none does."""
    for mode in order[:-1]:
        if not distributed.any_process(stash_bytes(mode) > STASH_MEMORY_SHARE * memory_bytes):
            return mode
    return order[-1]
