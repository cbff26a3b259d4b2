"""Synchronous data-parallel backpropagation (algorithm "bp") over the same stages: the baseline FDBP is compared with.

All stages run back to back on every replica; gradients are averaged over replicas and every stage
takes one optax update per step. On a mesh, every device is a replica (the model is replicated).
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fdbp_jax.distributed import place, to_host
from fdbp_jax.engines._cpu_convolutions import fast_convolutions
from fdbp_jax.engines._flat import mean_over, pad_to_multiple
from fdbp_jax.mesh import MESH_AXES, num_devices
from fdbp_jax.stages import (
    LossFn,
    Stage,
    backprop_grads,
    join_variables,
    predict_stages,
    replica_mean,
    replica_state,
    split_replicas,
    split_variables,
    synchronous_update,
)

ALL_DEVICES = P(MESH_AXES)


@flax.struct.dataclass
class BackpropState:
    tick: jax.Array
    params: list
    model_state: list
    opt_state: list


class Backprop:
    """BP with `replicas` workers simulated by vmap on one device, or on every device of `mesh`."""

    def __init__(
        self, stages: Sequence[Stage], loss_fn: LossFn, optimizers: Sequence[optax.GradientTransformation],
        replicas: int = 1, mesh: Mesh | None = None, skip_nonfinite: bool = False,
    ):
        self.stages = list(stages)
        self.loss_fn = loss_fn
        self.optimizers = list(optimizers)  # one per stage
        self.mesh = mesh
        self.skip_nonfinite = skip_nonfinite
        self.replicas = num_devices(mesh) if mesh is not None else replicas
        if mesh is None:
            self._step = jax.jit(self._emulated_step)
            self._predict = jax.jit(self._predict_fn)
        else:
            self._step = jax.jit(
                jax.shard_map(
                    self._replica_step, mesh=mesh, in_specs=(P(), ALL_DEVICES, ALL_DEVICES),
                    out_specs=(P(), P()), check_vma=False,
                ),
                donate_argnums=0,
            )
            self._predict = jax.jit(
                jax.shard_map(
                    self._predict_fn, mesh=mesh, in_specs=(P(), P(), ALL_DEVICES), out_specs=ALL_DEVICES,
                    check_vma=False,
                )
            )

    def init(self, variables: Sequence[dict], shapes, label) -> BackpropState:
        params, model_state = zip(*(split_variables(v) for v in variables))
        # fresh buffers: the mesh step donates its state, and must never delete the caller's arrays
        params, model_state = jax.tree.map(jnp.array, (params, model_state))
        state = BackpropState(
            tick=jnp.zeros((), jnp.int32),
            params=list(params),
            model_state=list(model_state),
            opt_state=[o.init(p) for o, p in zip(self.optimizers, params)],
        )
        if self.mesh is not None:
            state = place(state, jax.tree.map(lambda _: NamedSharding(self.mesh, P()), state))
        return state

    @property
    def batch_sharding(self) -> NamedSharding | None:
        """How a global batch lies on the mesh (every device a replica); None on one device."""
        return None if self.mesh is None else NamedSharding(self.mesh, ALL_DEVICES)

    def step(self, state: BackpropState, x, y):
        return self._step(state, *self._placed(x, y))

    def lower(self, state: BackpropState, x, y) -> jax.stages.Lowered:
        """The step `step` would run, lowered (for its compiled cost and memory)."""
        return self._step.lower(state, *self._placed(x, y))

    def _placed(self, x, y):
        if self.mesh is None:
            return x, y
        return place(x, self.batch_sharding), place(y, self.batch_sharding)

    def stage_variables(self, state: BackpropState) -> list[dict]:
        return to_host([join_variables(p, s) for p, s in zip(state.params, state.model_state)])

    def predict(self, state: BackpropState, x) -> jax.Array:
        if self.mesh is None:
            return self._predict(state.params, state.model_state, x)
        padded = pad_to_multiple(x, self.replicas)
        logits = self._predict(state.params, state.model_state, place(padded, NamedSharding(self.mesh, ALL_DEVICES)))
        return to_host(logits)[: len(x)]

    def _predict_fn(self, params, model_state, x):
        return predict_stages(self.stages, [join_variables(p, s) for p, s in zip(params, model_state)], x)

    def _grads(self, state: BackpropState, x, y, replica):
        keys = [stage.forward_key(state.tick, replica) for stage in self.stages]
        return backprop_grads(self.stages, self.loss_fn, state.params, state.model_state, x, y, keys)

    def _emulated_step(self, state: BackpropState, x, y):
        loss, model_state, grads = jax.vmap(self._grads, in_axes=(None, 0, 0, 0))(
            state, split_replicas(x, self.replicas), split_replicas(y, self.replicas), jnp.arange(self.replicas)
        )
        return self._update(state, *replica_mean((loss, grads)), replica_state(model_state))

    def _replica_step(self, state: BackpropState, x, y):
        grads_fn = fast_convolutions(self._grads, self.mesh.devices.flat[0].platform)
        loss, model_state, grads = grads_fn(state, x, y, jax.lax.axis_index(MESH_AXES))
        (loss, grads), model_state = mean_over(MESH_AXES, (loss, grads), model_state)
        return self._update(state, loss, grads, model_state)

    def _update(self, state: BackpropState, loss, grads, model_state):
        """Every stage has a forward and a gradient at every step."""
        params, opt_state, new_model_state, nonfinite = synchronous_update(
            self.optimizers, state.params, state.opt_state, state.model_state, grads, model_state, self.skip_nonfinite
        )
        new_state = BackpropState(tick=state.tick + 1, params=params, model_state=new_model_state, opt_state=opt_state)
        return new_state, {"loss": loss, "tick": state.tick, "nonfinite": nonfinite}
