"""The device mesh: axis ``data`` holds data-parallel replicas, axis ``stage`` the pipeline stages."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh

MESH_AXES = ("data", "stage")


def make_mesh(data: int = 1, stage: int = 1, devices: list | None = None) -> Mesh:
    """Build a ``(data, stage)`` mesh over the first ``data * stage`` devices.

    Each stage's parameters live on the ``data`` devices of its column; stage k sends activations
    to stage k+1 along the ``stage`` axis.
    """
    for name, value in (("data", data), ("stage", stage)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"make_mesh: {name}={value!r} must be a positive integer")
    devices = list(jax.devices() if devices is None else devices)
    needed = data * stage
    if needed > len(devices):
        platform = devices[0].platform if devices else "none"
        hint = (
            f"; on CPU, simulate them with XLA_FLAGS=--xla_force_host_platform_device_count={needed}"
            " set before JAX is imported"
            if platform == "cpu"
            else ""
        )
        raise ValueError(
            f"make_mesh: data={data} x stage={stage} needs {needed} devices but only "
            f"{len(devices)} {platform} device(s) are available{hint}"
        )
    return Mesh(np.asarray(devices[:needed], dtype=object).reshape(data, stage), MESH_AXES)


def check_mesh(mesh: Mesh, num_stages: int | None = None) -> None:
    """Raise ValueError unless `mesh` has axes ("data", "stage") and, if given, `num_stages` stages."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh from fdbp_jax.make_mesh, got {type(mesh).__name__}")
    if tuple(mesh.axis_names) != MESH_AXES:
        raise ValueError(
            f"mesh axes are {tuple(mesh.axis_names)}, expected {MESH_AXES}: build it with "
            "fdbp_jax.make_mesh(data=N, stage=K)"
        )
    if num_stages is not None and mesh.shape["stage"] != num_stages:
        raise ValueError(
            f"mesh has stage={mesh.shape['stage']} but the model has K={num_stages} stages: "
            f"use make_mesh(data=N, stage={num_stages})"
        )


def num_devices(mesh: Mesh) -> int:
    """Total devices in the mesh."""
    return math.prod(mesh.shape.values())
