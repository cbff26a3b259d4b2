"""Weight prediction (SpecTrain; PipeMare's discrepancy correction): stage k runs its forward on its
weights extrapolated over its delay from its last update, w + delay * (w - w_before_last_update), the
weights the gradient will meet when it comes back; the real weights are updated."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import optax


class PredictionState(NamedTuple):
    """The wrapped optimizer's state and the update it applied last (zeros before the first)."""

    inner: Any
    last_update: Any


def remember_update(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optimizer`, unchanged, with the update it returns kept in its state (`PredictionState`)."""

    def init(params):
        return PredictionState(optimizer.init(params), jax.tree.map(jax.numpy.zeros_like, params))

    def update(grads, state, params=None):
        updates, inner = optimizer.update(grads, state.inner, params)
        return updates, PredictionState(inner, updates)

    return optax.GradientTransformation(init, update)


@dataclasses.dataclass(frozen=True)
class WeightPrediction:
    """Forwards on the weights linearly extrapolated over the stage's delay from its last update."""

    name: str = "predict"
    moves_forward_weights: bool = True

    def optimizer(self, optimizer: optax.GradientTransformation, delay: int) -> optax.GradientTransformation:
        return remember_update(optimizer)

    def forward_params(self, params: Any, opt_state: PredictionState, delay: int) -> Any:
        if delay == 0:  # the last stage's gradient is fresh: nothing to predict
            return params
        return jax.tree.map(lambda w, u: w + delay * u.astype(w.dtype), params, opt_state.last_update)
