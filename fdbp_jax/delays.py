"""Seedable delay models for the stochastic-staleness emulator: how many ticks old each stage's
gradient is at each tick, when workers run at uneven speeds.

A gradient can never come back sooner than the pipeline's round trip, stage_delay(k, K) = 2(K-1-k)
ticks; slow workers only add to it. `DelayModel` adds a random extra delay in [0, max_extra] to each
stage at each tick (independently, with probability `slow_probability`), drawn from `seed` and the
tick alone, so a run is reproducible and resumable. max_extra = 0 is the fixed FDBP schedule.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fdbp_jax.schedule import stage_delay


@dataclasses.dataclass(frozen=True)
class DelayModel:
    """Stage k's gradient at tick t is stage_delay(k, K) + extra ticks old, extra uniform in
    [0, max_extra] with probability slow_probability (else 0), drawn from (seed, t, k)."""

    num_stages: int
    max_extra: int = 0
    slow_probability: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"DelayModel num_stages={self.num_stages!r}: must be a positive integer")
        if not isinstance(self.max_extra, int) or self.max_extra < 0:
            raise ValueError(f"DelayModel max_extra={self.max_extra!r}: must be an integer >= 0 (0 = fixed schedule)")
        if not 0.0 <= self.slow_probability <= 1.0:
            raise ValueError(f"DelayModel slow_probability={self.slow_probability!r}: must be in [0, 1]")

    @property
    def bound(self) -> int:
        """The largest delay the model can draw: 2(K-1) + max_extra."""
        return stage_delay(0, self.num_stages) + self.max_extra

    def minimum(self) -> jax.Array:
        """The fixed FDBP delays 2(K-1-k), k = 0..K-1 (the pipeline's round trip, the least possible)."""
        return jnp.asarray([stage_delay(k, self.num_stages) for k in range(self.num_stages)], jnp.int32)

    def __call__(self, tick: jax.Array) -> jax.Array:
        """The K delays at `tick` (int32, traceable)."""
        if self.max_extra == 0:
            return self.minimum()
        key = jax.random.fold_in(jax.random.key(self.seed), tick)
        slow_key, extra_key = jax.random.split(key)
        slow = jax.random.bernoulli(slow_key, self.slow_probability, (self.num_stages,))
        extra = jax.random.randint(extra_key, (self.num_stages,), 0, self.max_extra + 1, jnp.int32)
        return self.minimum() + jnp.where(slow, extra, 0)
