"""The engines: one per training algorithm and placement, all behind one `Engine` interface.

An algorithm is registered once in `ALGORITHMS` with how it lies on the mesh and how its engine is
built; `Trainer` only looks it up. The rules of a tick that every engine shares live in
`fdbp_jax.schedule` (who has a forward, who has a gradient, when the loss is valid) and
`fdbp_jax.stages` (`finish_stage`: skip, optax update and model state of one stage;
`replica_state_mean`: model state over replicas). A new synchronous schedule is one file with its
operation order (see `gpipe.py`) and one entry here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import jax
import optax
from jax.sharding import Mesh, NamedSharding

from fdbp_jax.corrections import Correction, NoCorrection
from fdbp_jax.delays import DelayModel
from fdbp_jax.engines._stash_choice import AUTO as AUTO_STASH
from fdbp_jax.engines.bp import Backprop
from fdbp_jax.engines.fdbp_emulator import Emulator
from fdbp_jax.engines.fdbp_mesh import STASH_CHOICES, STASH_MODES, MeshEngine
from fdbp_jax.engines.fdbp_stochastic import StochasticEmulator
from fdbp_jax.engines.gpipe import gpipe_order
from fdbp_jax.engines.one_f_one_b import one_f_one_b_order
from fdbp_jax.engines.pipeline import MeshPipeline, PipelineEmulator
from fdbp_jax.engines.timetable import Timetable
from fdbp_jax.stages import LossFn, Stage


@runtime_checkable
class Engine(Protocol):
    """What `Trainer` needs of an engine. `shapes` are each stage's per-replica input and the logits
    (from `stages.trace_shapes`), `label` one replica's labels."""

    stages: list
    loss_fn: LossFn
    batch_sharding: NamedSharding | None  # how `step` lays a global batch on the mesh (None: one device)

    def init(self, variables: Sequence[dict], shapes: Sequence[jax.ShapeDtypeStruct],
             label: jax.ShapeDtypeStruct) -> Any: ...

    def step(self, state: Any, x: Any, y: Any) -> tuple[Any, dict]: ...

    def lower(self, state: Any, x: Any, y: Any) -> jax.stages.Lowered: ...

    def stage_variables(self, state: Any) -> list[dict]: ...

    def predict(self, state: Any, x: Any) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """Every engine setting `Trainer` takes; each algorithm reads the ones it uses."""

    mesh: Mesh | None = None
    replicas: int = 1  # data-parallel workers (the mesh's, or simulated by vmap without one)
    shrink: float = 1.0
    stash: str = AUTO_STASH
    skip_nonfinite: bool = False
    delays: DelayModel | None = None
    microbatches: int = 1
    correction: Correction = NoCorrection()  # FDBP's staleness correction (`fdbp_jax.corrections`)


Builder = Callable[[list[Stage], LossFn, list[optax.GradientTransformation], EngineOptions], Engine]


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """One training algorithm: how it lies on a mesh, and how its engine is built."""

    build: Builder
    pipelined: bool  # stage k on mesh column k (True), or the whole model on every device (False)
    description: str
    microbatched: bool = False  # takes `microbatches`


def _fdbp(stages, loss_fn, optimizers, o: EngineOptions) -> Engine:
    if o.delays is not None:
        return StochasticEmulator(stages, loss_fn, optimizers, o.shrink, o.replicas, o.delays, o.skip_nonfinite,
                                  o.correction)
    if o.mesh is None:
        return Emulator(stages, loss_fn, optimizers, o.shrink, o.replicas, o.skip_nonfinite, o.correction)
    return MeshEngine(stages, loss_fn, optimizers, o.shrink, o.mesh, o.stash, o.skip_nonfinite, o.correction)


def _bp(stages, loss_fn, optimizers, o: EngineOptions) -> Engine:
    return Backprop(stages, loss_fn, optimizers, replicas=o.replicas, mesh=o.mesh, skip_nonfinite=o.skip_nonfinite)


@dataclasses.dataclass(frozen=True)
class SynchronousPipeline:
    """Builder of a synchronous pipeline engine from a schedule's per-stage operation order
    (`order(k, num_stages, microbatches)`, as in `gpipe.py`)."""

    order: Callable[[int, int, int], list]

    def timetable(self, num_stages: int, microbatches: int) -> Timetable:
        """The schedule's ticks for K stages and M micro-batches (what `fdbp_jax.perf` times)."""
        return Timetable.from_orders([self.order(k, num_stages, microbatches) for k in range(num_stages)],
                                     microbatches)

    def __call__(self, stages, loss_fn, optimizers, o: EngineOptions) -> Engine:
        timetable = self.timetable(len(stages), o.microbatches)
        if o.mesh is None:
            return PipelineEmulator(stages, loss_fn, optimizers, timetable, o.replicas, o.skip_nonfinite)
        return MeshPipeline(stages, loss_fn, optimizers, timetable, o.mesh, o.skip_nonfinite)


ALGORITHMS: dict[str, Algorithm] = {
    "fdbp": Algorithm(_fdbp, pipelined=True, description="fully decoupled backprop (delayed gradients)"),
    "bp": Algorithm(_bp, pipelined=False, description="synchronous data-parallel backprop"),
    "gpipe": Algorithm(SynchronousPipeline(gpipe_order), pipelined=True, microbatched=True,
                       description="synchronous pipeline, all forwards then all backwards"),
    "1f1b": Algorithm(SynchronousPipeline(one_f_one_b_order), pipelined=True, microbatched=True,
                      description="synchronous pipeline, one forward one backward"),
}


def pipeline_timetable(algorithm: str, num_stages: int, microbatches: int) -> Timetable:
    """The timetable a synchronous pipeline algorithm ("gpipe", "1f1b") runs with K stages and M micro-batches."""
    build = ALGORITHMS[algorithm].build if algorithm in ALGORITHMS else None
    if not isinstance(build, SynchronousPipeline):
        pipelines = sorted(name for name, a in ALGORITHMS.items() if isinstance(a.build, SynchronousPipeline))
        raise ValueError(f"algorithm {algorithm!r} has no timetable: the synchronous pipelines are {', '.join(pipelines)}")
    return build.timetable(num_stages, microbatches)


def split_stash(algorithm: str, stash: str) -> str | None:
    """How the stages before the last keep each forward for their backward, whose extra work a
    cost-balanced split adds to their cost (`split_blocks(stash=...)`): FDBP's `stash` ("auto" counted
    as "selective": auto takes it wherever its rings fit), "recompute" for the synchronous pipelines
    (they run each forward again), None for BP (one stage)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm!r} is not known: use one of {', '.join(ALGORITHMS)}")
    if not ALGORITHMS[algorithm].pipelined:
        return None
    if algorithm != "fdbp":
        return "recompute"
    return "selective" if stash == AUTO_STASH else stash


__all__ = ["ALGORITHMS", "AUTO_STASH", "Algorithm", "Engine", "EngineOptions", "STASH_CHOICES", "STASH_MODES",
           "SynchronousPipeline", "pipeline_timetable", "split_stash"]
