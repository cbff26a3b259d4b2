"""Single-device FDBP with stochastic staleness (the paper's setting): stage k's gradient at tick t is
delays[k] = delay_model(t)[k] ticks old, drawn at random within a bound instead of fixed at
stage_delay(k, K). The mesh engine keeps the fixed schedule; this is a reference for studying it.

Forwards keep the pipeline's timing: stage k runs batch t-k at tick t with its current weights (or
those its correction gives, `fdbp_stage.StageTick.forward_params`), and
every forward's input, labels, weights and model state are kept for `bound + 1` ticks. The gradient
stage k applies at tick t is the exact one of the forward it ran at tick s = t - delays[k] (batch
b = s - k): the loss of batch b through stage k with the weights it had at s and through each later
stage j with the weights j had when it ran b (tick b + j), times shrink^(K-1-k) (beta once per
boundary crossed, as in the pipeline). With the fixed delays this is the pipeline's gradient exactly
(tests/test_stochastic.py checks it against `Emulator`). Gradients of batches < 0 (warm-up) are none.
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
from fdbp_jax.delays import DelayModel
from fdbp_jax.engines.fdbp_emulator import Emulator
from fdbp_jax.stages import (
    LossFn,
    Stage,
    apply_update,
    finish_stage,
    float32_loss,
    forward,
    replica_mean,
    replica_state,
    split_replicas,
    split_variables,
)


@flax.struct.dataclass
class StochasticState:
    """Current weights per stage and, per stage, rings of the last `bound + 1` ticks' forwards
    (slot = tick mod (bound + 1))."""

    tick: jax.Array
    params: list
    model_state: list
    opt_state: list
    param_history: list  # stage k: the params it had at each tick of the ring
    state_history: list  # stage k: its model state at each tick of the ring
    input_history: list  # stage k: (ring, replicas, b, ...) the input its forward took at each tick
    label_history: list  # stage k: the labels travelling with that input
    act_msgs: list  # boundary k: activation sent by stage k, arriving at stage k+1 next tick
    label_msgs: list


def history_slot(tick, ring: int):
    """Ring slot holding what happened at `tick`."""
    return tick % ring


class StochasticEmulator(Emulator):
    """FDBP on one device with per-stage, per-tick random delays from `delay_model`. Shares the
    fixed-delay emulator's set-up, step, stage_variables and predict; its state and tick differ."""

    def __init__(
        self, stages: Sequence[Stage], loss_fn: LossFn, optimizers: Sequence[optax.GradientTransformation],
        shrink: float, replicas: int, delay_model: DelayModel, skip_nonfinite: bool = False,
        correction: Correction = NoCorrection(),
    ):
        if delay_model.num_stages != len(stages):
            raise ValueError(
                f"delay model is for {delay_model.num_stages} stages but there are {len(stages)}: "
                f"use DelayModel(num_stages={len(stages)}, ...)"
            )
        super().__init__(stages, loss_fn, optimizers, shrink, replicas, skip_nonfinite, correction)
        self.delay_model = delay_model
        self.ring = delay_model.bound + 1

    def init(self, variables: Sequence[dict], shapes: Sequence[jax.ShapeDtypeStruct], label: jax.ShapeDtypeStruct):
        """State at tick 0 from per-stage variables and per-replica input shapes (from trace_shapes)."""
        K, R, ring = len(self.stages), self.replicas, self.ring
        params, model_state = map(list, zip(*(split_variables(v) for v in variables)))
        rings = lambda tree: jax.tree.map(lambda a: jnp.zeros((ring, *a.shape), a.dtype), tree)
        per_replica = lambda s, lead=(): jnp.zeros((*lead, R, *s.shape), s.dtype)
        return StochasticState(
            tick=jnp.zeros((), jnp.int32),
            params=params,
            model_state=model_state,
            opt_state=[o.init(p) for o, p in zip(self.optimizers, params)],
            param_history=[rings(p) for p in params],
            state_history=[rings(s) for s in model_state],
            input_history=[per_replica(shapes[k], (ring,)) for k in range(K)],
            label_history=[per_replica(label, (ring,)) for _ in range(K)],
            act_msgs=[per_replica(shapes[k + 1]) for k in range(K - 1)],
            label_msgs=[per_replica(label) for _ in range(K - 1)],
        )

    def _tick(self, state: StochasticState, x: jax.Array, y: jax.Array):
        K, t, ring = len(self.stages), state.tick, self.ring
        now = history_slot(t, ring)
        record = lambda history, value: jax.tree.map(lambda h, v: h.at[now].set(v), history, value)
        inputs = [split_replicas(x, self.replicas)] + state.act_msgs
        labels = [split_replicas(y, self.replicas)] + state.label_msgs
        work = self.stage_ticks
        weights = [w.forward_params(p, o) for w, p, o in zip(work, state.params, state.opt_state)]
        history = dict(  # the weights each forward ran with
            param_history=[record(h, p) for h, p in zip(state.param_history, weights)],
            state_history=[record(h, s) for h, s in zip(state.state_history, state.model_state)],
            input_history=[h.at[now].set(v) for h, v in zip(state.input_history, inputs)],
            label_history=[h.at[now].set(v) for h, v in zip(state.label_history, labels)],
        )
        act_msgs, label_msgs, fwd_states, loss = [], [], [], jnp.nan
        replicas = jnp.arange(self.replicas)
        for k in range(K):
            run = partial(lambda k, r, h: work[k].forward(t, r, weights[k], state.model_state[k], h), k)
            outputs, fwd_state = jax.vmap(run)(replicas, inputs[k])
            fwd_states.append(fwd_state)
            if k < K - 1:
                act_msgs.append(outputs)
                label_msgs.append(labels[k])
            else:
                losses = jax.vmap(partial(float32_loss, self.loss_fn))(outputs, labels[k])
                loss = jnp.where(schedule.loss_is_valid(t, K), jnp.mean(losses), jnp.nan)
        delays = self.delay_model(t)
        new = dict(params=[], model_state=[], opt_state=[])
        nonfinite = []
        for k in range(K):
            grads, has_gradient = self._stale_gradient(k, t - delays[k], history)
            finished = finish_stage(
                partial(apply_update, self.optimizers[k]), state.params[k], state.opt_state[k], state.model_state[k],
                grads, replica_state(fwd_states[k]), schedule.has_forward(t, k), has_gradient, self.skip_nonfinite,
            )
            for key, value in zip(("params", "opt_state", "model_state"), finished):
                new[key].append(value)
            nonfinite.append(finished[3])
        new_state = StochasticState(tick=t + 1, act_msgs=act_msgs, label_msgs=label_msgs, **new, **history)
        return new_state, {"loss": loss, "tick": t, "nonfinite": jnp.stack(nonfinite), "delays": delays}

    def _stale_gradient(self, k: int, forward_tick: jax.Array, history: dict):
        """Stage k's gradient for the forward it ran at `forward_tick`: exact, through the weights
        every later stage used on that batch, averaged over replicas; and whether that batch exists."""
        K, ring = len(self.stages), self.ring
        batch = schedule.forward_batch(forward_tick, k)
        at = lambda tree, tick: jax.tree.map(lambda h: h[history_slot(tick, ring)], tree)
        when_it_ran = lambda j, name: at(history[name][j], batch + j)
        later = [(self.stages[j], when_it_ran(j, "param_history"), when_it_ran(j, "state_history")) for j in range(k + 1, K)]
        own_state = at(history["state_history"][k], forward_tick)

        def loss_of(p, h, labels, replica):
            h, _ = forward(self.stages[k], p, own_state, h, self.stages[k].forward_key(batch, replica))
            for stage, params, model_state in later:
                h, _ = forward(stage, params, model_state, h, stage.forward_key(batch, replica))
            return float32_loss(self.loss_fn, h, labels)

        grads = jax.vmap(jax.grad(loss_of), in_axes=(None, 0, 0, 0))(
            at(history["param_history"][k], forward_tick),
            at(history["input_history"][k], forward_tick),
            at(history["label_history"][k], forward_tick),
            jnp.arange(self.replicas),
        )
        scale = self.shrink ** (K - 1 - k)
        return jax.tree.map(lambda g: scale * g, replica_mean(grads)), batch >= 0
