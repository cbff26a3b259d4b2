"""What the single-device engines (the FDBP emulators, the pipeline emulator) share: one jitted step,
and the variables and inference of all stages held as plain per-stage lists."""

from __future__ import annotations

from typing import Any, Callable

import jax

from fdbp_jax.stages import join_variables, predict_stages


class SingleDeviceEngine:
    """Base of an engine whose state has per-stage lists `params` and `model_state`; a subclass
    calls `_compile(step_fn)` with its `(state, x, y) -> (state, metrics)`."""

    batch_sharding = None  # one device: batches are used as given
    stages: list

    def _compile(self, step_fn: Callable) -> None:
        self._step = jax.jit(step_fn)
        self._predict = jax.jit(self._predict_fn)

    def step(self, state: Any, x: jax.Array, y: jax.Array):
        return self._step(state, x, y)

    def lower(self, state: Any, x: jax.Array, y: jax.Array) -> jax.stages.Lowered:
        """The step `step` would run, lowered (for its compiled cost and memory)."""
        return self._step.lower(state, x, y)

    def stage_variables(self, state: Any) -> list[dict]:
        return jax.device_get([join_variables(p, s) for p, s in zip(state.params, state.model_state)])

    def predict(self, state: Any, x: jax.Array) -> jax.Array:
        return self._predict(state.params, state.model_state, x)

    def _predict_fn(self, params, model_state, x):
        return predict_stages(self.stages, [join_variables(p, s) for p, s in zip(params, model_state)], x)
