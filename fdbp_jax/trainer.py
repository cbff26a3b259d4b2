"""`Trainer`: the public entry point. Builds the engine of the chosen algorithm (`engines.ALGORITHMS`,
on a mesh or emulated on one device), the initial state, and checks inputs so that mistakes
surface as one clear ValueError."""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from fdbp_jax import distributed, engines
from fdbp_jax.corrections import Correction, as_correction
from fdbp_jax.delays import DelayModel
from fdbp_jax.engines import AUTO_STASH, STASH_CHOICES, Engine, EngineOptions
from fdbp_jax.mesh import check_mesh, num_devices
from fdbp_jax.schedule import stage_delay
from fdbp_jax.boundaries import is_array, pack_boundaries
from fdbp_jax.stages import LossFn, NnxStage, as_stage, describe_shape, float32_loss, trace_shapes

ALGORITHMS = tuple(engines.ALGORITHMS)
# compute dtype -> what the stages cast parameters and inputs to (None: leave them float32)
COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


class Trainer:
    """Train K stages with fully decoupled backprop ("fdbp"), synchronous data-parallel backprop
    ("bp"), or a synchronous pipeline ("gpipe", "1f1b": each step one global batch in
    ``microbatches`` micro-batches, exactly backprop, idle for `engine.bubble_fraction` of a step;
    with BatchNorm each micro-batch has its own statistics, as "bp" with N*M replicas; see
    `engines/pipeline.py`).

    With a mesh, FDBP and the pipelines run stage k on the devices of mesh column k, replicated
    over "data"; BP replicates the whole model on every device. With ``mesh=None`` the
    single-device emulator runs the same algorithm, simulating ``replicas`` data-parallel workers. ``stash`` picks what the mesh
    engine keeps of each in-flight forward: its input and weights ("recompute": the forward runs
    again in the backward; the least memory), the outputs of its convolutions and matmuls
    ("selective": the backward re-runs only the elementwise ops between them) or all its VJP residuals
    ("residuals": no recomputation, the most memory). The default, "auto", takes at `init` the fastest
    of selective and recompute whose stash fits in the device's memory (`engines/_stash_choice.py`);
    `Trainer.stash` then names it.
    ``delays`` (a `DelayModel`, emulator only) draws each stage's gradient delay at random per tick
    instead of the fixed 2(K-1-k): FDBP with stochastic staleness. ``compute_dtype="bfloat16"``:
    activations, messages between stages and compute in bfloat16; parameters, gradients, optimizer
    and BatchNorm state stay float32. In a run of several processes, `step` and `predict` also take
    just this process's rows of the global batch (`local_rows`), so no process reads the whole batch.
    Stages are flax.nnx modules (trained from the weights they hold) or flax.linen ones (initialised
    from `init`'s key), mixed as you like; a stage boundary may be a pytree of arrays. Dropout draws
    from a key per forward, from ``dropout_seed``, the stage, the batch and the replica
    (`stages.Stage.forward_key`). ``correction`` (FDBP; `fdbp_jax.corrections`: "none", "predict",
    "lookahead", or one configured, e.g. `Lookahead(momentum=0.95)`) corrects the stale gradients:
    "predict" runs each forward on the stage's weights extrapolated over its delay from its last update;
    "lookahead" makes the stage's momentum a delay-aware Nesterov look-ahead (give it an optimizer
    without momentum, e.g. `optax.sgd(lr)`). Both compose with per-stage optimizers such as
    `fdbp_jax.optim.staleness_aware` and with ``shrink``.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module | nnx.Module],
        loss_fn: LossFn,
        optimizer: optax.GradientTransformation | Sequence[optax.GradientTransformation],
        mesh: Mesh | None = None,
        algorithm: str = "fdbp",
        shrink: float = 1.0,
        replicas: int | None = None,
        stash: str = AUTO_STASH,
        skip_nonfinite: bool = False,
        delays: DelayModel | None = None,
        compute_dtype: str = "float32",
        microbatches: int = 1,
        dropout_seed: int = 0,
        correction: str | Correction = "none",
    ):
        stages = list(stages)
        if not stages or not all(isinstance(s, (nn.Module, nnx.Module)) for s in stages):
            raise ValueError(
                "stages must be a non-empty list of flax.nnx or flax.linen Modules, one per pipeline stage"
            )
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm={algorithm!r} is not known: use one of {ALGORITHMS}")
        if not isinstance(shrink, (int, float)) or not 0.0 < shrink <= 1.0:
            raise ValueError(f"shrink={shrink!r} must be in (0, 1] (1.0 = no gradient shrinking)")
        if stash not in STASH_CHOICES:
            raise ValueError(f"stash={stash!r} is not known: use one of {STASH_CHOICES}")
        if replicas is not None and (not isinstance(replicas, int) or replicas < 1):
            raise ValueError(f"replicas={replicas!r} must be a positive integer")
        if delays is not None:
            if not isinstance(delays, DelayModel):
                raise ValueError(f"delays={delays!r} must be a fdbp_jax.DelayModel (or None: the fixed schedule)")
            if algorithm != "fdbp" or mesh is not None:
                raise ValueError(
                    "delays= (stochastic staleness) runs in the FDBP emulator only: use algorithm='fdbp' and "
                    "mesh=None; the mesh engine keeps the fixed schedule"
                )
        spec = engines.ALGORITHMS[algorithm]
        if not isinstance(microbatches, int) or microbatches < 1:
            raise ValueError(f"microbatches={microbatches!r} must be a positive integer")
        if microbatches > 1 and not spec.microbatched:
            raise ValueError(
                f"microbatches={microbatches} applies to the synchronous pipelines "
                f"({', '.join(n for n, a in engines.ALGORITHMS.items() if a.microbatched)}), not {algorithm!r}"
            )
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype={compute_dtype!r} is not known: use one of {tuple(COMPUTE_DTYPES)}")
        self.compute_dtype = compute_dtype
        if not isinstance(dropout_seed, int):
            raise ValueError(f"dropout_seed={dropout_seed!r} must be an integer")
        self.stages = [as_stage(m, compute_dtype=COMPUTE_DTYPES[compute_dtype], index=k, seed=dropout_seed)
                       for k, m in enumerate(stages)]
        optimizers = [optimizer] * len(stages) if isinstance(optimizer, optax.GradientTransformation) else list(optimizer)
        if len(optimizers) != len(stages) or not all(isinstance(o, optax.GradientTransformation) for o in optimizers):
            raise ValueError(
                f"optimizer must be one optax.GradientTransformation or a list of {len(stages)} (one per stage)"
            )
        self.correction = as_correction(correction)
        if self.correction.name != "none":
            if algorithm != "fdbp":
                raise ValueError(f"correction={self.correction.name!r} corrects FDBP's stale gradients: use "
                                 f"algorithm='fdbp', or correction='none' for {algorithm!r}")
            optimizers = [self.correction.optimizer(o, stage_delay(k, len(stages))) for k, o in enumerate(optimizers)]
        self.algorithm = algorithm
        self.microbatches = microbatches
        self.mesh = mesh
        if mesh is not None:
            check_mesh(mesh, len(stages) if spec.pipelined else None)
            self.replicas = mesh.shape["data"] if spec.pipelined else num_devices(mesh)
            if replicas is not None and replicas != self.replicas:
                raise ValueError(f"replicas={replicas} disagrees with the mesh, which gives {self.replicas}")
        else:
            self.replicas = replicas or 1
        options = EngineOptions(mesh=mesh, replicas=self.replicas, shrink=float(shrink), stash=stash,
                                skip_nonfinite=skip_nonfinite, delays=delays, microbatches=microbatches,
                                correction=self.correction)
        self._build = partial(spec.build, loss_fn=loss_fn, optimizers=optimizers, o=options)
        self.engine: Engine = self._build(self.stages)
        self._batch: tuple | None = None

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def stash(self) -> str | None:
        """The stash FDBP's mesh engine runs (after `init`, "auto" resolved to a mode); None for other engines."""
        return getattr(self.engine, "stash", None)

    def init(
        self, rng: jax.Array, example_x: Any, variables: Sequence[dict] | None = None, example_y: Any = None
    ):
        """State at tick 0. `example_x` is one global batch (its size is fixed from now on);
        `variables` (K entries: a flax variable dict for a linen stage, an `nnx.State` for an NNX one)
        replaces the initial weights (linen: random from `rng`; NNX: the ones the module holds);
        `example_y` sets the label shape and dtype (default: integer class labels, one per example)."""
        example_x = jnp.asarray(example_x)
        example_y = jnp.zeros(example_x.shape[:1], jnp.int32) if example_y is None else jnp.asarray(example_y)
        self._check_batch(example_x, example_y, "example_x")
        local = lambda a: jax.ShapeDtypeStruct((a.shape[0] // self.replicas, *a.shape[1:]), a.dtype)
        if variables is None:
            variables = self._initial_variables(rng, local(example_x))
        elif len(variables) != self.num_stages:
            raise ValueError(f"variables has {len(variables)} entries but there are {self.num_stages} stages")
        else:
            variables = [stage.engine_variables(v) for stage, v in zip(self.stages, variables)]
        shapes = trace_shapes(self.stages, variables, local(example_x))
        if not is_array(shapes[-1]):
            raise ValueError(f"the last stage must return one array of logits, got {describe_shape(shapes[-1])}")
        if not all(map(is_array, shapes[1:-1])):  # pytree boundaries: packed, and the engine built for them
            self.stages, shapes = pack_boundaries(self.stages, shapes)
            self.engine = self._build(self.stages)
        self._check_loss(shapes[-1], local(example_y))
        self._batch = (example_x.shape, example_x.dtype, example_y.shape, example_y.dtype)
        return self.engine.init(variables, shapes, local(example_y))

    def step(self, state, x, y) -> tuple[Any, dict]:
        """One tick: batch (x, y) enters stage 0; returns the new state and metrics: "loss" (of the
        batch at the last stage; NaN in FDBP's warm-up; bp and the synchronous pipelines give this
        batch's loss at every step), "tick", and "nonfinite" (K flags: stages whose
        gradient this tick had a NaN/inf; with skip_nonfinite=True their update was skipped); with
        ``delays``, also "delays" (the K delays drawn for this tick)."""
        if self._batch is None:
            raise ValueError("call trainer.init(...) before trainer.step(...)")
        x_shape, x_dtype, y_shape, y_dtype = self._batch
        x, y = self.global_batch(x_shape[0], x, y)
        if tuple(x.shape) != tuple(x_shape) or tuple(y.shape) != tuple(y_shape):
            raise ValueError(
                f"batch shapes x{tuple(x.shape)}, y{tuple(y.shape)} differ from init's x{tuple(x_shape)}, "
                f"y{tuple(y_shape)}: every tick takes a global batch of the size given to init"
            )
        # host batches stay on the host until the engine places each part on the devices that use it
        as_input = lambda a, dtype: a.astype(dtype) if isinstance(a, jax.Array) else np.asarray(a, dtype)
        return self.engine.step(state, as_input(x, x_dtype), as_input(y, y_dtype))

    def compiled_step(self, state, x, y) -> jax.stages.Compiled:
        """The compiled tick `step(state, x, y)` runs: its `memory_analysis()` and `cost_analysis()`
        are what benchmarks read (nothing runs)."""
        x, y = self.global_batch(self._batch[0][0], x, y) if self._batch else (x, y)
        return self.engine.lower(state, x, y).compile()

    def local_rows(self, batch: int) -> range:
        """The rows of a global batch of `batch` examples that this process's devices use: what it
        has to read (all of them with one process; a contiguous block of its own with several)."""
        sharding = self.engine.batch_sharding
        if sharding is None or jax.process_count() == 1:
            return range(batch)
        return distributed.process_rows(sharding, batch)

    def global_batch(self, batch: int, *arrays) -> tuple:
        """This process's rows (`local_rows(batch)`) of arrays of a global batch of `batch` examples ->
        global jax.Arrays laid out as the engine's batch; global batches (and one process) as they are."""
        if jax.process_count() == 1 or len(arrays[0]) == batch or len(arrays[0]) != len(self.local_rows(batch)):
            return arrays
        sharding = self.engine.batch_sharding
        return tuple(distributed.from_local_rows(np.asarray(a), sharding, batch) for a in arrays)

    def stage_variables(self, state) -> list:
        """The K stages' variables as host arrays, in the form `init` takes: a flax variable dict for a
        linen stage, an `nnx.State` for an NNX one (`nnx.update(module, state)` loads it)."""
        return [stage.public_variables(v) for stage, v in zip(self.stages, self.engine.stage_variables(state))]

    def predict(self, state, x, batch: int | None = None) -> jax.Array:
        """Logits of a full forward with the current weights, in inference mode. With several
        processes, `x` may be this process's `local_rows(batch)` of a global batch of `batch`."""
        if batch is not None:
            (x,) = self.global_batch(batch, x)
        return self.engine.predict(state, x)

    def _check_batch(self, x, y, name: str) -> None:
        if x.ndim < 1 or x.shape[0] < 1:
            raise ValueError(f"{name} must have a leading batch axis, got shape {tuple(x.shape)}")
        if x.shape[0] % self.replicas:
            raise ValueError(
                f"global batch {x.shape[0]} is not divisible by the data-parallel size {self.replicas}: "
                f"use a batch that is a multiple of {self.replicas}"
            )
        if x.shape[0] % (self.replicas * self.microbatches):
            raise ValueError(
                f"global batch {x.shape[0]} does not split into {self.microbatches} micro-batches on each of "
                f"{self.replicas} replicas: use a batch that is a multiple of {self.replicas * self.microbatches}"
            )
        if y.shape[:1] != x.shape[:1]:
            raise ValueError(f"labels have batch {y.shape[:1]} but inputs have {x.shape[:1]}")

    def _initial_variables(self, rng: jax.Array, x: jax.ShapeDtypeStruct) -> list[dict]:
        """Random linen variables from `rng`; NNX stages start from the weights their modules hold."""
        variables, h = [], x
        for k, (stage, key) in enumerate(zip(self.stages, jax.random.split(rng, self.num_stages))):
            try:
                init = stage.init if isinstance(stage, NnxStage) else jax.jit(stage.init)
                v = init(key, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), h))
            except Exception as err:
                raise ValueError(
                    f"stage {k} ({type(stage.module).__name__}) cannot be initialised on input "
                    f"{describe_shape(h)}: {type(err).__name__}: {str(err).splitlines()[0]}"
                ) from None
            variables.append(v)
            h = trace_shapes([stage], [v], h, first=k)[-1]
        return variables

    def _check_loss(self, logits: jax.ShapeDtypeStruct, labels: jax.ShapeDtypeStruct) -> None:
        out = jax.eval_shape(partial(float32_loss, self.engine.loss_fn), logits, labels)
        if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
            raise ValueError(f"loss_fn(logits, labels) must return a scalar, got {out}")
