"""The optimizer and its step sizes: the CLI's SGD and learning-rate schedule, and the staleness-aware
step sizes for FDBP, as optax transformations composed after the user's optimizer.

Stage k applies gradients that are stage_delay(k, K) = 2(K-1-k) ticks old. Analyses of SGD with
delayed gradients (e.g. Lian et al. 2015; Stich & Karimireddy 2020) converge when the step size
shrinks as the delay grows (eta <= c / (L (1 + tau)) for a bounded delay tau). `delay_scaled`
multiplies stage k's updates by (1 + delay)^-power, and can warm them up linearly over a number of
updates proportional to the delay; power 0 and no warm-up is plain FDBP, exactly.
"""

from __future__ import annotations

import optax

from fdbp_jax.config import Config
from fdbp_jax.corrections import Correction, Lookahead, as_correction
from fdbp_jax.schedule import first_update_tick, stage_delay


def delay_factor(delay: int, power: float) -> float:
    """The update multiplier for a gradient `delay` ticks old: (1 + delay)^-power."""
    return float((1 + delay) ** -power)


def warmup_ramp(delay: int, warmup_per_delay: int) -> optax.Schedule | None:
    """The multiplier ramping a stage's updates up linearly over warmup_per_delay * delay updates
    (None: no ramp)."""
    warmup = warmup_per_delay * delay
    return optax.linear_schedule(1.0 / warmup, 1.0, warmup) if warmup > 0 else None


def delay_scaled(
    optimizer: optax.GradientTransformation, delay: int, power: float = 1.0, warmup_per_delay: int = 0
) -> optax.GradientTransformation:
    """`optimizer`'s updates scaled by delay_factor(delay, power), ramped up linearly over the first
    warmup_per_delay * delay updates."""
    parts = [optimizer, optax.scale(delay_factor(delay, power))]
    ramp = warmup_ramp(delay, warmup_per_delay)
    if ramp is not None:
        parts.append(optax.scale_by_schedule(ramp))
    return optax.chain(*parts)


def staleness_aware(
    optimizer: optax.GradientTransformation, num_stages: int, power: float = 1.0, warmup_per_delay: int = 0
) -> list[optax.GradientTransformation]:
    """One optimizer per stage for `Trainer(optimizer=...)`, each scaled for that stage's delay
    (power 1 by default, as the CLI: stage k's step / (1 + stage_delay(k, K)))."""
    return [delay_scaled(optimizer, stage_delay(k, num_stages), power, warmup_per_delay) for k in range(num_stages)]


def lr_schedule(config: Config, ticks_per_epoch: int) -> optax.Schedule:
    """Linear warm-up, then constant, step (/10 at `step_epochs`) or cosine decay, in updates."""
    total = max(1, config.epochs * ticks_per_epoch)
    warmup = min(total - 1, int(round(config.warmup_epochs * ticks_per_epoch)))
    if config.schedule == "constant":
        main = optax.constant_schedule(config.lr)
    elif config.schedule == "cosine":
        main = optax.cosine_decay_schedule(config.lr, total - warmup)
    else:
        epochs = config.step_epochs or (config.epochs // 2, (3 * config.epochs) // 4)
        main = optax.piecewise_constant_schedule(
            config.lr, {max(1, int(e * ticks_per_epoch) - warmup): 0.1 for e in epochs}
        )
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(config.lr / warmup, config.lr, warmup), main], [warmup])


def make_optimizer(
    config: Config, ticks_per_epoch: int
) -> optax.GradientTransformation | list[optax.GradientTransformation]:
    """SGD with (PyTorch-style, coupled) weight decay, momentum and the schedule. For FDBP with the
    staleness control on (the default), one per stage, its updates scaled for the stage's delay. With
    --correction lookahead the momentum is the correction's (`correction`), so SGD here has none."""
    own_momentum = config.momentum if config.correction != "lookahead" else 0.0
    sgd = optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(lr_schedule(config, ticks_per_epoch), momentum=own_momentum or None),
    )
    if config.algorithm == "fdbp" and (config.staleness_power or config.staleness_warmup):
        return staleness_aware(sgd, config.stages, config.staleness_power, config.staleness_warmup)
    return sgd


def correction(config: Config) -> Correction:
    """The staleness correction of the settings (lookahead carries --momentum)."""
    if config.correction == "lookahead":
        return Lookahead(momentum=config.momentum)
    return as_correction(config.correction)


def learning_rates(config: Config, ticks_per_epoch: int, tick: int) -> list[float]:
    """Each stage's step size after `tick` ticks: the schedule at the stage's update count (FDBP stage
    k updates from tick first_update_tick(k, K) on), times its staleness factor."""
    schedule_fn = lr_schedule(config, ticks_per_epoch)
    if config.algorithm != "fdbp":  # synchronous: every stage updates at every step from the first
        return [float(schedule_fn(tick))] * config.stages
    rates = []
    for k in range(config.stages):
        delay, updates = stage_delay(k, config.stages), max(0, tick - first_update_tick(k, config.stages))
        ramp = warmup_ramp(delay, config.staleness_warmup)
        rates.append(float(schedule_fn(updates)) * delay_factor(delay, config.staleness_power)
                     * (1.0 if ramp is None else float(ramp(updates))))
    return rates
