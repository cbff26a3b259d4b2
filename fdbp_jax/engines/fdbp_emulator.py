"""Single-device reference of fully decoupled backpropagation (algorithm "fdbp", mesh=None): every
stage, in order, in one jitted tick, with `replicas` data-parallel workers simulated by vmap; each
stage's part of the tick is `fdbp_stage.StageTick`. The mesh engine must match it.

Tick t, stage k (the contract):
  forward   batch forward_batch(t, k) with the current weights (or those the correction gives); stash
            (input, those weights) in slot stash_slot(t, k, K), once the backward below has read what
            that slot held (the forward of stage_delay(k, K) ticks ago); send the activation (and labels) to
            stage k+1 for tick t+1.
  last      stage K-1 computes loss and gradients at once and sends the input-gradient back.
  backward  stage k < K-1 takes the input-gradient stage k+1 sent at tick t-1, scales it by the
            shrink factor and backpropagates it through its stashed forward of stage_delay(k, K)
            ticks ago (an exact delayed gradient); the input-gradient goes on to stage k-1.
  update    gradients are averaged over replicas; stage k updates from first_update_tick(k, K) on.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import optax

from fdbp_jax import schedule
from fdbp_jax.corrections import Correction, NoCorrection
from fdbp_jax.engines._single_device import SingleDeviceEngine
from fdbp_jax.engines.fdbp_stage import StageTick, Stashed
from fdbp_jax.stages import (
    LossFn,
    Stage,
    apply_update,
    finish_stage,
    replica_mean,
    replica_state,
    split_replicas,
    split_variables,
)


@flax.struct.dataclass
class EmulatorState:
    """All of the pipeline, stage by stage. Lists of length K (per stage) or K-1 (per boundary)."""

    tick: jax.Array
    params: list
    model_state: list
    opt_state: list
    stash_inputs: list  # stage k < K-1: (depth_k, replicas, b, ...) inputs of forwards in flight
    stash_params: list  # stage k < K-1: the params those forwards used, leading axis depth_k
    stash_model_state: list
    act_msgs: list  # boundary k: activation sent by stage k, arriving at stage k+1 next tick
    label_msgs: list  # boundary k: the labels travelling with it
    grad_msgs: list  # boundary k: input-gradient sent by stage k+1, arriving at stage k next tick


class Emulator(SingleDeviceEngine):
    """The FDBP contract executed on one device; the reference every engine is tested against."""

    def __init__(
        self, stages: Sequence[Stage], loss_fn: LossFn, optimizers: Sequence[optax.GradientTransformation],
        shrink: float, replicas: int, skip_nonfinite: bool = False, correction: Correction = NoCorrection(),
    ):
        self.stages = list(stages)
        self.loss_fn = loss_fn
        self.optimizers = list(optimizers)  # one per stage
        self.shrink = shrink
        self.replicas = replicas
        self.skip_nonfinite = skip_nonfinite
        self.correction = correction
        self.stage_ticks = [StageTick(s, k, len(self.stages), loss_fn, shrink, correction)
                            for k, s in enumerate(self.stages)]
        self._compile(self._tick)

    def init(self, variables: Sequence[dict], shapes: Sequence[jax.ShapeDtypeStruct], label: jax.ShapeDtypeStruct):
        """State at tick 0 from per-stage variables and per-replica input shapes (from trace_shapes)."""
        K, R = len(self.stages), self.replicas
        params, model_state = zip(*(split_variables(v) for v in variables))
        zeros = lambda shape, dtype: jnp.zeros(shape, dtype)
        per_replica = lambda s: zeros((R, *s.shape), s.dtype)
        inner = range(K - 1)
        depth = [schedule.stash_depth(k, K) for k in inner]
        return EmulatorState(
            tick=jnp.zeros((), jnp.int32),
            params=list(params),
            model_state=list(model_state),
            opt_state=[o.init(p) for o, p in zip(self.optimizers, params)],
            stash_inputs=[zeros((depth[k], R, *shapes[k].shape), shapes[k].dtype) for k in inner],
            stash_params=[jax.tree.map(lambda a, d=depth[k]: zeros((d, *a.shape), a.dtype), params[k]) for k in inner],
            stash_model_state=[
                jax.tree.map(lambda a, d=depth[k]: zeros((d, *a.shape), a.dtype), model_state[k]) for k in inner
            ],
            act_msgs=[per_replica(shapes[k + 1]) for k in inner],
            label_msgs=[per_replica(label) for _ in inner],
            grad_msgs=[per_replica(shapes[k + 1]) for k in inner],
        )

    def _tick(self, state: EmulatorState, x: jax.Array, y: jax.Array):
        K, t = len(self.stages), state.tick
        shared_weights = lambda fn, batched: jax.vmap(fn, in_axes=(None, None) + (0,) * batched)
        new = dict(params=[], model_state=[], opt_state=[], stash_inputs=[], stash_params=[], stash_model_state=[])
        act_msgs, label_msgs, grad_msgs = [None] * (K - 1), [None] * (K - 1), [None] * (K - 1)
        loss, nonfinite = jnp.nan, []
        replicas = jnp.arange(self.replicas)  # each forward's key: its batch, stage and replica
        for k, work in enumerate(self.stage_ticks):
            params, model_state = state.params[k], state.model_state[k]
            x_in = split_replicas(x, self.replicas) if k == 0 else state.act_msgs[k - 1]
            labels = split_replicas(y, self.replicas) if k == 0 else state.label_msgs[k - 1]
            if work.is_last:
                last = lambda p, s, h, l, r: work.last(t, r, p, s, h, l)
                losses, fwd_state, grads, input_grads = shared_weights(last, 3)(
                    params, model_state, x_in, labels, replicas
                )
                loss = jnp.where(schedule.loss_is_valid(t, K), jnp.mean(losses), jnp.nan)
            else:
                weights = work.forward_params(params, state.opt_state[k])
                outputs, fwd_state = shared_weights(lambda p, s, h, r: work.forward(t, r, p, s, h), 2)(
                    weights, model_state, x_in, replicas
                )
                act_msgs[k], label_msgs[k] = outputs, labels
                # the backward's forward is read before this tick's is written: both take the same slot
                back_slot = schedule.stash_slot(t - work.delay, k, K)
                stashed = Stashed(*jax.tree.map(lambda r: r[back_slot], (state.stash_params[k], state.stash_model_state[k])),
                                  state.stash_inputs[k][back_slot])
                slot = schedule.stash_slot(t, k, K)
                stash_inputs = state.stash_inputs[k].at[slot].set(x_in)
                stash_params = jax.tree.map(lambda r, a: r.at[slot].set(a), state.stash_params[k], weights)
                stash_state = jax.tree.map(lambda r, a: r.at[slot].set(a), state.stash_model_state[k], model_state)
                grads, input_grads = jax.vmap(partial(work.backward, t), in_axes=(0, Stashed(None, None, 0), 0))(
                    replicas, stashed, state.grad_msgs[k]
                )
                new["stash_inputs"].append(stash_inputs)
                new["stash_params"].append(stash_params)
                new["stash_model_state"].append(stash_state)
            if k > 0:
                grad_msgs[k - 1] = input_grads
            finished = finish_stage(
                partial(apply_update, self.optimizers[k]), params, state.opt_state[k], model_state,
                replica_mean(grads), replica_state(fwd_state), schedule.has_forward(t, k),
                schedule.has_gradient(t, k, K), self.skip_nonfinite,
            )
            for key, value in zip(("params", "opt_state", "model_state"), finished):
                new[key].append(value)
            nonfinite.append(finished[3])
        new_state = EmulatorState(
            tick=t + 1, act_msgs=act_msgs, label_msgs=label_msgs, grad_msgs=grad_msgs, **new
        )
        return new_state, {"loss": loss, "tick": t, "nonfinite": jnp.stack(nonfinite)}
