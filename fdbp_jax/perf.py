"""A speed model: tick time and throughput of FDBP (K stages x N replicas) and of data-parallel BP on
the same K*N devices, from per-stage compute times, activation bytes and a link's bandwidth/latency.

FDBP tick: every stage works at once, so the tick lasts as long as the slowest stage: its forward on
the new batch, its backward (plus the forward again when the stash recomputes), sending its
activation and input-gradient to its neighbours, and the all-reduce of its gradient over N replicas.
BP step: each of the K*N replicas runs the whole model on B/(K*N) examples, then all-reduces the
whole gradient. Compute is taken as linear in the batch (per-example costs).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Sequence

import jax


@dataclasses.dataclass(frozen=True)
class Link:
    """A device-to-device link: bytes per second each way, and per-message latency in seconds."""

    bandwidth: float
    latency: float

    def transfer(self, nbytes: float) -> float:
        return 0.0 if nbytes <= 0 else self.latency + nbytes / self.bandwidth

    def all_reduce(self, nbytes: float, devices: int) -> float:
        """Ring all-reduce: 2 (n-1) steps of nbytes / n each."""
        if devices <= 1 or nbytes <= 0:
            return 0.0
        return 2 * (devices - 1) * self.transfer(nbytes / devices)


@dataclasses.dataclass(frozen=True)
class StageCost:
    """One stage, per example: forward and backward seconds, the bytes of its output activation
    (sent forward, and its gradient sent back), and the bytes of its parameters."""

    forward: float
    backward: float
    activation_bytes: float
    param_bytes: float


def fdbp_tick_time(stages: Sequence[StageCost], batch: int, replicas: int, link: Link, recompute: bool = True) -> float:
    """Seconds per FDBP tick (one global batch of `batch` examples enters the pipeline)."""
    local = batch / replicas
    times = []
    for k, s in enumerate(stages):
        compute = local * (s.forward * (2 if recompute and k < len(stages) - 1 else 1) + s.backward)
        sends = link.transfer(local * s.activation_bytes) if k < len(stages) - 1 else 0.0
        receives_grad = link.transfer(local * stages[k - 1].activation_bytes) if k > 0 else 0.0
        times.append(compute + max(sends, receives_grad) + link.all_reduce(s.param_bytes, replicas))
    return max(times)


def bp_step_time(stages: Sequence[StageCost], batch: int, devices: int, link: Link) -> float:
    """Seconds per data-parallel BP step on `devices` replicas of the whole model."""
    local = batch / devices
    compute = local * sum(s.forward + s.backward for s in stages)
    return compute + link.all_reduce(sum(s.param_bytes for s in stages), devices)


def single_device_time(stages: Sequence[StageCost], batch: int) -> float:
    return batch * sum(s.forward + s.backward for s in stages)


def shared_cores_tick_time(stages: Sequence[StageCost], batch: int, replicas: int, cores: int, recompute: bool = True) -> float:
    """FDBP tick when the K*N devices are simulated on `cores` CPU cores: the work of all devices
    shares the cores, and no tick is shorter than its slowest stage."""
    local = batch / replicas
    per_stage = [
        local * (s.forward * (2 if recompute and k < len(stages) - 1 else 1) + s.backward) for k, s in enumerate(stages)
    ]
    return max(max(per_stage), replicas * sum(per_stage) / cores)


def speedups(stages: Sequence[StageCost], batch: int, stages_k: int, replicas: int, link: Link, recompute: bool = True) -> dict:
    """Throughput (examples/s) and speedup over one device of FDBP and of BP on the same K*N devices."""
    one = single_device_time(stages, batch)
    fdbp = fdbp_tick_time(stages, batch, replicas, link, recompute)
    bp = bp_step_time(stages, batch, stages_k * replicas, link)
    return {
        "fdbp_examples_per_s": batch / fdbp, "bp_examples_per_s": batch / bp,
        "fdbp_speedup": one / fdbp, "bp_speedup": one / bp, "single_examples_per_s": batch / one,
    }


def time_steps(trainer: Any, state: Any, x, y, steps: int, warmup: int = 3) -> tuple[float, float, Any]:
    """Measure `trainer.step` on one batch: (seconds of the first call, compile included; median
    seconds of `steps` calls after `warmup` more; the final state)."""

    def timed(state):
        start = time.perf_counter()
        state, _ = trainer.step(state, x, y)
        jax.block_until_ready(state)
        return time.perf_counter() - start, state

    first, state = timed(state)
    for _ in range(warmup):
        _, state = timed(state)
    samples = []
    for _ in range(steps):
        seconds, state = timed(state)
        samples.append(seconds)
    return first, statistics.median(samples), state
