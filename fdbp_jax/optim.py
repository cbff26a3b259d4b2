"""Staleness-aware step sizes for FDBP, as optax transformations composed after the user's optimizer.

Stage k applies gradients that are stage_delay(k, K) = 2(K-1-k) ticks old. Analyses of SGD with
delayed gradients (e.g. Lian et al. 2015; Stich & Karimireddy 2020) converge when the step size
shrinks as the delay grows (eta <= c / (L (1 + tau)) for a bounded delay tau). `delay_scaled`
multiplies stage k's updates by (1 + delay)^-power, and can warm them up linearly over a number of
updates proportional to the delay; power 0 and no warm-up is plain FDBP, exactly.
"""

from __future__ import annotations

import optax

from fdbp_jax.schedule import stage_delay


def delay_factor(delay: int, power: float) -> float:
    """The update multiplier for a gradient `delay` ticks old: (1 + delay)^-power."""
    return float((1 + delay) ** -power)


def delay_scaled(
    optimizer: optax.GradientTransformation, delay: int, power: float = 1.0, warmup_per_delay: int = 0
) -> optax.GradientTransformation:
    """`optimizer`'s updates scaled by delay_factor(delay, power), ramped up linearly over the first
    warmup_per_delay * delay updates."""
    parts = [optimizer, optax.scale(delay_factor(delay, power))]
    warmup = warmup_per_delay * delay
    if warmup > 0:
        parts.append(optax.scale_by_schedule(optax.linear_schedule(1.0 / warmup, 1.0, warmup)))
    return optax.chain(*parts)


def staleness_aware(
    optimizer: optax.GradientTransformation, num_stages: int, power: float = 1.0, warmup_per_delay: int = 0
) -> list[optax.GradientTransformation]:
    """One optimizer per stage for `Trainer(optimizer=...)`, each scaled for that stage's delay
    (power 1 by default, as the CLI: stage k's step / (1 + stage_delay(k, K)))."""
    return [delay_scaled(optimizer, stage_delay(k, num_stages), power, warmup_per_delay) for k in range(num_stages)]
