"""Stage k's part of one FDBP tick, for one replica: the rules of the contract written once, run by
every FDBP driver (the emulator's vmap over replicas, the mesh's stage switch, the stochastic
emulator's forwards). The weights a forward runs with come from the correction's hook
(`forward_params`), so a staleness correction changes no engine."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax

from fdbp_jax import schedule
from fdbp_jax.corrections import Correction, NoCorrection
from fdbp_jax.stages import LossFn, Stage, delayed_grads, forward, last_stage_grads


class Stashed(NamedTuple):
    """One in-flight forward as stage k keeps it (recompute stash): the weights it ran with, the model
    state it started from and its input."""

    params: Any
    model_state: Any
    x: jax.Array


@dataclasses.dataclass(frozen=True)
class StageTick:
    """What stage `index` of `num_stages` does at tick t: its forward of batch forward_batch(t, k), and
    the exact delayed gradient of the forward it ran stage_delay(k, K) ticks ago."""

    stage: Stage
    index: int
    num_stages: int
    loss_fn: LossFn
    shrink: float = 1.0
    correction: Correction = NoCorrection()

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    @property
    def delay(self) -> int:
        return schedule.stage_delay(self.index, self.num_stages)

    def forward_params(self, params: Any, opt_state: Any) -> Any:
        """The weights this tick's forward runs with (and stashes): the correction's hook."""
        return self.correction.forward_params(params, opt_state, self.delay)

    def forward_key(self, t: jax.Array, replica: jax.Array) -> jax.Array:
        return self.stage.forward_key(schedule.forward_batch(t, self.index), replica)

    def backward_key(self, t: jax.Array, replica: jax.Array) -> jax.Array:
        """The key of the forward this tick's backward belongs to (it draws the same dropout mask)."""
        return self.stage.forward_key(schedule.backward_batch(t, self.index, self.num_stages), replica)

    def forward(self, t, replica, params, model_state, x) -> tuple[jax.Array, dict]:
        """(activation for stage k+1, the forward's model state)."""
        return forward(self.stage, params, model_state, x, self.forward_key(t, replica))

    def last(self, t, replica, params, model_state, x, labels) -> tuple[jax.Array, dict, Any, jax.Array | None]:
        """The last stage: (loss, model state, dparams, dinput or None for K = 1) of this tick's batch."""
        return last_stage_grads(self.stage, self.loss_fn, params, model_state, x, labels,
                                input_grad=self.index > 0, key=self.forward_key(t, replica))

    def output_grad(self, arriving: jax.Array) -> jax.Array:
        """The input-gradient stage k+1 sent last tick, shrunk by beta."""
        return self.shrink * arriving

    def backward(self, t, replica, stashed: Stashed, arriving: jax.Array) -> tuple[Any, jax.Array | None]:
        """(dparams, dinput or None for stage 0) of the stashed forward, re-run, for the arriving gradient."""
        grads, input_grad, _ = delayed_grads(self.stage, stashed.params, stashed.model_state, stashed.x,
                                             self.output_grad(arriving), input_grad=self.index > 0,
                                             key=self.backward_key(t, replica))
        return grads, input_grad
