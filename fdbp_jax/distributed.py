"""Multi-host support through JAX's own multi-controller runtime: start it, place host data as global
arrays, and bring global arrays back to every process. Single-process runs take the same paths."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Start `jax.distributed` from explicit values or, where they are None, from what the cluster sets
    (SLURM, Open MPI, TPU pods, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).
    On CPU, collectives across processes go through gloo."""
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or not _has_accelerator_hint():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
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
