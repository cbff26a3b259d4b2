"""A delay-aware Nesterov look-ahead, in the spirit of the Nesterov correction of asynchronous pipeline
parallelism (Ajanthan et al., ICML 2025): the momentum is applied to the stage's updates so that the
weights its forwards see are already (1 + delay) momentum steps ahead of the base iterate, where the
weights will be when the gradient comes back. Delay 0 is Nesterov's momentum exactly; any delay keeps
the long-run step of heavy-ball momentum, lr / (1 - momentum), and only answers a gradient sooner."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class LookaheadState(NamedTuple):
    trace: Any  # the momentum trace of the updates


def delay_nesterov(momentum: float, delay: int) -> optax.GradientTransformation:
    """Momentum over the updates u it is chained after: trace m <- momentum * m + u, and the update
    momentum^(1+delay) * m + s * u with s = (1 - momentum^(1+delay)) / (1 - momentum), the look-ahead
    of s momentum steps (delay 0: momentum * m + u, optax's Nesterov)."""
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum={momentum!r} must be in [0, 1)")
    carry = momentum ** (1 + delay)
    ahead = (1.0 - carry) / (1.0 - momentum)

    def init(params):
        return LookaheadState(jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        trace = jax.tree.map(lambda m, u: momentum * m + u, state.trace, updates)
        return jax.tree.map(lambda m, u: carry * m + ahead * u, trace, updates), LookaheadState(trace)

    return optax.GradientTransformation(init, update)


@dataclasses.dataclass(frozen=True)
class Lookahead:
    """The stage's momentum as a delay-aware look-ahead (`delay_nesterov`), chained after its
    optimizer, which should then have no momentum of its own (e.g. `optax.sgd(lr)`)."""

    momentum: float = 0.9
    name: str = "lookahead"
    moves_forward_weights: bool = False

    def optimizer(self, optimizer: optax.GradientTransformation, delay: int) -> optax.GradientTransformation:
        return optax.chain(optimizer, delay_nesterov(self.momentum, delay))

    def forward_params(self, params: Any, opt_state: Any, delay: int) -> Any:
        return params
