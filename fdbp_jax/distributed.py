"""Multi-host support through JAX's own multi-controller runtime: start it, place host data as global
arrays, and bring global arrays back to every process. Single-process runs take the same paths."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils


COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_timeout_seconds"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, collective_timeout_s: int = 60) -> None:
    """Start `jax.distributed` from explicit values or, where they are None, from what the cluster sets
    (SLURM, Open MPI, TPU pods, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).
    On CPU, collectives across processes go through gloo, and one that waits longer than
    `collective_timeout_s` on a peer fails (XLA's --xla_cpu_collective_timeout_seconds, unless XLA_FLAGS
    sets it): a send to a peer that died may otherwise wait until JAX's heartbeat aborts the process.
    Call it before JAX starts its backend."""
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or not _has_accelerator_hint():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        flags = os.environ.get("XLA_FLAGS", "")
        if COLLECTIVE_TIMEOUT_FLAG not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} {COLLECTIVE_TIMEOUT_FLAG}={collective_timeout_s}".strip()
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def _has_accelerator_hint() -> bool:
    return bool(os.environ.get("CUDA_VISIBLE_DEVICES") or os.environ.get("TPU_NAME") or os.path.exists("/dev/nvidia0")
                or os.path.exists("/dev/accel0"))


def place(tree: Any, shardings: Any) -> Any:
    """Host arrays (identical on every process) -> global jax.Arrays with `shardings`; each process
    builds only the shards its own devices hold. Arrays already laid out that way pass through."""

    def put(leaf, sharding):
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
            return leaf
        if jax.process_count() == 1:
            return jax.device_put(leaf, sharding)
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def to_host(tree: Any) -> Any:
    """Global jax.Arrays -> full numpy arrays on every process."""

    def get(leaf):
        if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
            return np.asarray(jax.device_get(leaf))
        if leaf.is_fully_replicated:
            return np.asarray(leaf.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))

    return jax.tree.map(get, tree)


def process_rows(sharding: jax.sharding.Sharding, batch: int) -> range:
    """The rows of a (batch, ...) array laid out by `sharding` that this process's devices hold: one
    contiguous block (a mesh whose "data" rows are ordered by process, as make_mesh builds it)."""
    blocks = sorted({(s[0].start or 0, batch if s[0].stop is None else s[0].stop)
                     for s in sharding.addressable_devices_indices_map((batch,)).values()})
    reach = blocks[0][1]
    for start, stop in blocks[1:]:
        if start > reach:
            raise ValueError(f"this process's devices hold rows {blocks} of the batch, not one block: order the "
                             "mesh's devices by process (fdbp_jax.make_mesh does) or feed the global batch")
        reach = max(reach, stop)
    return range(blocks[0][0], reach)


def from_local_rows(local: np.ndarray, sharding: jax.sharding.Sharding, batch: int) -> jax.Array:
    """A global (batch, ...) jax.Array from this process's rows (`process_rows`) of it."""
    rows = process_rows(sharding, batch)
    shape = (batch, *local.shape[1:])

    def shard(index):
        part = index[0]
        start = (part.start or 0) - rows.start
        stop = (batch if part.stop is None else part.stop) - rows.start
        return local[(slice(start, stop), *index[1:])]

    return jax.make_array_from_callback(shape, sharding, shard)


MESSAGE_BYTES = 4096  # longest message `first_error` carries between processes (longer ones are cut)


def _gather_bytes(text: str) -> list[str]:
    """Every process's `text` (utf-8, at most MESSAGE_BYTES), in process order, on every process."""
    encoded = text.encode()[:MESSAGE_BYTES]
    buffer = np.zeros(MESSAGE_BYTES, np.uint8)
    buffer[: len(encoded)] = np.frombuffer(encoded, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(buffer)).reshape(jax.process_count(), -1)
    return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in rows]


def first_error(message: str | None) -> str | None:
    """Agree on failure: every process passes its own error message (None: no error) and gets the
    first process's message, or None if no process failed. The same answer on every process, so all
    of them stop together (one process left alone would wait on its peers' collectives forever)."""
    if jax.process_count() == 1:
        return message
    return next((m[1:] for m in _gather_bytes("" if message is None else "!" + message) if m), None)


def on_process_zero(action: Callable[[], None]) -> None:
    """Run `action` (a check or a file operation on a folder every process shares) on process 0 only,
    then let every process go on together; a ValueError it raises is raised on every process."""
    message = None
    if jax.process_index() == 0:
        try:
            action()
        except ValueError as err:
            message = str(err)
    agreed = first_error(message)
    if agreed is not None:
        raise ValueError(agreed)


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is True on any process (a stop request, a failed read)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.bool_))))


def check_same_settings(settings: dict) -> None:
    """Refuse to start when the processes were given different settings (a ValueError on every process
    naming the first process that differs from process 0)."""
    if jax.process_count() == 1:
        return
    digests = _gather_bytes(hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest())
    different = [i for i, digest in enumerate(digests) if digest != digests[0]]
    if different:
        raise ValueError(f"process {different[0]} was started with other settings than process 0: start every "
                         "process with the same flags (only --process-id differs)")
