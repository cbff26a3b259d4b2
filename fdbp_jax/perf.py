"""A speed model: time per global batch of FDBP (K stages x N replicas), of the synchronous pipelines
(GPipe, 1F1B) on the same layout, and of data-parallel BP on the same K*N devices, from measured efficiency curves (seconds of work against the per-device batch,
`fdbp_jax.costs`) and a link's bandwidth and latency.

FDBP tick: every stage works at once, so a tick lasts as long as the slowest stage: its tick work on
B/N examples (forward of the new batch, delayed backward with its recomputed forward, update), the
send of its activation and receipt of its input-gradient, and the all-reduce of its gradient over N
replicas. BP step: each of the K*N replicas runs the whole model's step on B/(K*N) examples, then
all-reduces the whole gradient. Synchronous pipeline step: M + K - 1 slots, each as long as the
slowest stage's forward + backward of one micro-batch of B/(N M) examples, then one update; the
idle share of the slots is the bubble (K-1)/(M+K-1). Compute comes from the curves, so a device that is launch-bound at
small batches (a GPU at 16 examples) costs what it was measured to cost, not a linear share.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fdbp_jax.engines.timetable import FORWARD, Timetable


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
class Curve:
    """Seconds of one piece of work against the per-device batch, from measured (batch, seconds)
    points. Between points: linear interpolation. Below the smallest batch: that batch's time (a
    device gets no faster on fewer examples than its launch-bound floor; a bound, not a measurement).
    Above the largest: proportional to the batch at the largest point's rate (compute-bound)."""

    points: tuple[tuple[float, float], ...]

    def __post_init__(self):
        if not self.points:
            raise ValueError("a Curve needs at least one measured (batch, seconds) point")
        object.__setattr__(self, "points", tuple(sorted((float(b), float(s)) for b, s in self.points)))

    @classmethod
    def linear(cls, seconds_per_example: float) -> "Curve":
        """Compute linear in the batch (the model's old assumption), for comparisons and tests."""
        return cls(((1.0, seconds_per_example),))

    def __call__(self, batch: float) -> float:
        (b0, s0), (b1, s1) = self.points[0], self.points[-1]
        if batch <= b0:
            return s0
        if batch >= b1:
            return s1 * batch / b1
        for (lo, t_lo), (hi, t_hi) in zip(self.points, self.points[1:]):
            if lo <= batch <= hi:
                return t_lo + (t_hi - t_lo) * (batch - lo) / (hi - lo)
        raise AssertionError("unreachable: batch lies between the first and last points")


@dataclasses.dataclass(frozen=True)
class StageCost:
    """One stage: its whole tick work (forward, delayed backward, update) against the per-device
    batch, the bytes per example of its output activation (sent forward; its gradient comes back),
    the bytes of its parameters (all-reduced over the replicas), and its training forward alone
    (which the synchronous pipelines' timetables need)."""

    work: Curve
    activation_bytes: float
    param_bytes: float
    update: float = 0.0  # seconds of one optax update (included in `work`)
    forward: Curve | None = None  # the forward of a new batch (included in `work`)


def fdbp_tick_time(stages: Sequence[StageCost], batch: float, replicas: int, link: Link) -> float:
    """Seconds per FDBP tick (one global batch of `batch` examples enters the pipeline)."""
    local = batch / replicas
    times = []
    for k, s in enumerate(stages):
        sends = link.transfer(local * s.activation_bytes) if k < len(stages) - 1 else 0.0
        receives_grad = link.transfer(local * stages[k - 1].activation_bytes) if k > 0 else 0.0
        times.append(s.work(local) + max(sends, receives_grad) + link.all_reduce(s.param_bytes, replicas))
    return max(times)


def pipeline_step_time(stages: Sequence[StageCost], batch: float, replicas: int, timetable: Timetable,
                       link: Link) -> float:
    """Seconds per step of a synchronous pipeline training one global batch of `batch` examples by
    `timetable` (a `fdbp_jax.engines.timetable.Timetable`: GPipe's, 1F1B's). Its ticks run in lock
    step, each as long as its slowest operation plus the swap of both links' messages (sent every
    tick): a forward costs the stage's forward, a backward its tick work less one forward and the
    update (it runs the forward again, then backpropagates), the last stage's backward its tick work
    less the update (forward and backward at once; a forward of its own, where the timetable keeps one,
    is empty). Then one update and the all-reduce."""
    K = len(stages)
    if K != timetable.num_stages:
        raise ValueError(f"the timetable has K={timetable.num_stages} stages but {K} stage costs were given")
    if any(s.forward is None for s in stages[:-1]):
        raise ValueError("pipeline_step_time needs every stage's forward curve (StageCost.forward)")
    local = batch / (replicas * timetable.microbatches)

    def seconds(k: int, op) -> float:
        s, last = stages[k], k == K - 1
        if op[0] == FORWARD:
            return 0.0 if last else s.forward(local)
        return s.work(local) - s.update - (0.0 if last else s.forward(local))

    swap = max(max(link.transfer(local * s.activation_bytes) if k < K - 1 else 0.0,
                   link.transfer(local * stages[k - 1].activation_bytes) if k > 0 else 0.0)
               for k, s in enumerate(stages))
    ticks = sum(max((seconds(k, op) for k, op in enumerate(row) if op is not None), default=0.0) + swap
                for row in timetable.ops)
    return ticks + max(s.update + link.all_reduce(s.param_bytes, replicas) for s in stages)


def bp_step_time(step: Curve, param_bytes: float, batch: float, devices: int, link: Link) -> float:
    """Seconds per data-parallel BP step on `devices` replicas of the whole model (`step`: one
    replica's gradients + update against its batch)."""
    return step(batch / devices) + link.all_reduce(param_bytes, devices)


def shared_cores_tick_time(stages: Sequence[StageCost], batch: float, replicas: int, cores: int) -> float:
    """FDBP tick when the K*N devices are simulated on `cores` CPU cores: the work of all devices
    shares the cores, and no tick is shorter than its slowest stage."""
    per_stage = [s.work(batch / replicas) for s in stages]
    return max(max(per_stage), replicas * sum(per_stage) / cores)


TICK_CURVES = {  # FDBP stash -> its stage tick curve in `costs`
    "recompute": "tick", "selective": "tick_selective", "residuals": "tick_residuals"}


def stage_costs(measured: dict, num_stages: int, bytes_per_element: int = 4,
                stash: str = "recompute") -> list[StageCost]:
    """The K-stage split of a `fdbp_jax.costs` measurement as StageCosts, each stage's tick work that
    of the FDBP `stash` (the recompute stash's is also what the synchronous pipelines' backwards cost)."""
    if stash not in TICK_CURVES:
        raise ValueError(f"stash={stash!r} has no measured tick curve: the speed model knows {tuple(TICK_CURVES)}")
    split = measured["splits"].get(str(num_stages))
    if split is None or not split["stages"][0]["tick"]:
        raise ValueError(f"the measurement of {measured.get('model')} has no curves for K={num_stages}: "
                         f"measured K are {sorted(measured['splits'])}")
    curve = TICK_CURVES[stash]
    if not split["stages"][0].get(curve):
        raise ValueError(f"the measurement of {measured.get('model')} has no {curve!r} curves (made before "
                         f"fdbp_jax.costs measured the {stash} stash): measure it again")
    return [
        StageCost(Curve(tuple(map(tuple, s[curve]))), bytes_per_element * s["activation_elements"], 4 * s["param_count"],
                  s.get("update_s") or 0.0, Curve(tuple(map(tuple, s["forward"]))) if s.get("forward") else None)
        for s in split["stages"]
    ]


def bp_costs(measured: dict, bytes_per_param: int = 4) -> tuple[Curve, float]:
    """(the whole model's BP step curve, its gradient bytes) from a `fdbp_jax.costs` measurement."""
    if not measured["bp_step"]:
        raise ValueError(f"the measurement of {measured.get('model')} has no BP step curve")
    split = next(iter(measured["splits"].values()))
    params = sum(s["param_count"] for s in split["stages"])
    return Curve(tuple(map(tuple, measured["bp_step"]))), bytes_per_param * params


def load_costs(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def ticks_to_accuracy(evals: Sequence[dict], target: float) -> int | None:
    """Ticks (global batches trained) until a run's test accuracy first reached `target`, from its
    eval events (metrics.jsonl rows with `tick` and `test_accuracy`); None if it never did."""
    for event in sorted(evals, key=lambda e: e["tick"]):
        if event.get("test_accuracy") is not None and event["test_accuracy"] >= target:
            return int(event["tick"])
    return None


def _timed_step(trainer: Any, state: Any, x, y) -> tuple[float, Any]:
    start = time.perf_counter()
    state, _ = trainer.step(state, x, y)
    jax.block_until_ready(state)
    return time.perf_counter() - start, state


def time_steps(trainer: Any, state: Any, x, y, steps: int, warmup: int = 3) -> tuple[float, float, Any]:
    """Measure `trainer.step` on one batch: (seconds of the first call, compile included; median
    seconds of `steps` calls after `warmup` more; the final state): one run of `time_interleaved`."""
    return time_interleaved({"run": (trainer, state)}, x, y, steps, rounds=1, warmup=warmup)["run"]


def time_interleaved(runs: Mapping[str, tuple[Any, Any]], x, y, steps: int, rounds: int,
                     warmup: int = 3) -> dict[str, tuple[float, float, Any]]:
    """`trainer.step` of several (trainer, state) pairs on one batch: each one's first call (compile
    included) and `warmup` more, then `rounds` rounds of `steps` steps each in turn, so a machine whose
    speed drifts over minutes slows every run alike and the ratios of their medians hold:
    {label: (seconds of the first call, median seconds per step, final state)}."""
    first, states, samples = {}, {}, {label: [] for label in runs}
    for label, (trainer, state) in runs.items():
        first[label], states[label] = _timed_step(trainer, state, x, y)
        for _ in range(warmup):
            _, states[label] = _timed_step(trainer, states[label], x, y)
    for _ in range(rounds):
        for label, (trainer, _) in runs.items():
            for _ in range(steps):
                seconds, states[label] = _timed_step(trainer, states[label], x, y)
                samples[label].append(seconds)
    return {label: (first[label], statistics.median(samples[label]), states[label]) for label in runs}


def random_inputs(shapes, seed: int = 0):
    """Standard-normal arrays for a pytree of ShapeDtypeStructs (one stage input, or a pytree boundary
    such as a half block's {"h", "skip"}), drawn leaf by leaf from one seeded generator: timing inputs."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)


def median_seconds(fn: Callable, *args, repeats: int = 20, warmup: int = 2) -> float:
    """Median wall seconds of `fn(*args)` (results awaited) after a compiling call and `warmup` more."""
    for _ in range(1 + warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)
