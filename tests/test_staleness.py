"""The staleness-aware step size: its arithmetic, that it composes with optax, that switching it off
is plain FDBP exactly, and that it scales each stage's first update by its delay."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import toy

import fdbp_jax as fj
from fdbp_jax import optim


def test_delay_factor():
    assert optim.delay_factor(0, 0.5) == 1.0
    assert optim.delay_factor(3, 0.5) == pytest.approx(0.5)
    assert optim.delay_factor(6, 1.0) == pytest.approx(1 / 7)
    assert optim.delay_factor(6, 0.0) == 1.0


def test_composes_with_any_optax_transformation():
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.array([1.0, -2.0, 0.5])}
    base = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1))
    scaled = optim.delay_scaled(base, delay=3, power=0.5, warmup_per_delay=2)
    plain_update, _ = base.update(grads, base.init(params), params)
    update, state = scaled.update(grads, scaled.init(params), params)
    # first of 6 warm-up updates: factor 0.5 (delay 3) times 1/6
    np.testing.assert_allclose(update["w"], plain_update["w"] * 0.5 / 6, rtol=1e-6)
    for _ in range(6):
        update, state = scaled.update(grads, state, params)
    assert jnp.all(jnp.isfinite(update["w"]))


def run(optimizer, mesh=None, ticks=6):
    xs, ys = toy.batches(ticks, batch=4)
    trainer = fj.Trainer(toy.conv_stages(2), toy.cross_entropy, optimizer, mesh=mesh)
    state = trainer.init(jax.random.key(0), xs[0])
    initial = trainer.stage_variables(state)
    for x, y in zip(xs, ys):
        state, _ = trainer.step(state, x, y)
    return initial, trainer.stage_variables(state)


def test_switched_off_is_plain_fdbp_exactly():
    """On the mesh engine (the emulator applies the same optax transformations)."""
    sgd = optax.sgd(0.1, momentum=0.9)
    _, plain = run(sgd, fj.make_mesh(1, 2))
    _, off = run(optim.staleness_aware(sgd, 2, power=0.0, warmup_per_delay=0), fj.make_mesh(1, 2))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(off), strict=True):
        np.testing.assert_array_equal(a, b)


def test_each_stage_is_scaled_by_its_own_delay():
    """K=2, plain SGD, stopped right after each stage's first update: stage 0 (delay 2) moved by
    3^-0.5 of the plain step, stage 1 (delay 0) by exactly the plain step."""
    sgd = optax.sgd(0.1)
    initial, plain = run(sgd, ticks=3)
    _, scaled = run(optim.staleness_aware(sgd, 2, power=0.5), ticks=3)
    step = lambda after, k: jax.tree.map(lambda a, b: a - b, after[k]["params"], initial[k]["params"])
    for k, factor in ((0, 3 ** -0.5), (1, 1.0)):
        for got, full in zip(jax.tree.leaves(step(scaled, k)), jax.tree.leaves(step(plain, k))):
            np.testing.assert_allclose(got, factor * full, rtol=1e-4, atol=1e-7)


def test_trainer_rejects_wrong_number_of_optimizers():
    with pytest.raises(ValueError, match="a list of 2 \\(one per stage\\)"):
        fj.Trainer(toy.conv_stages(2), toy.cross_entropy, [optax.sgd(0.1)] * 3)


def test_cli_default_scales_each_fdbp_stage_and_switches_off():
    """The control is on by default for --algorithm fdbp (power 1: stage k's step / (1 + delay_k)),
    `--staleness-power 0` gives plain SGD again, and BP never gets it."""
    import dataclasses

    from fdbp_jax.cli import build_parser, config_from_args
    from fdbp_jax.optim import make_optimizer

    config = config_from_args(build_parser().parse_args(
        ["--stages", "4", "--lr", "0.1", "--momentum", "0", "--weight-decay", "0", "--schedule", "constant"]
    ))
    params, grads = {"w": jnp.ones(2)}, {"w": jnp.ones(2)}
    first_update = lambda opt: float(opt.update(grads, opt.init(params), params)[0]["w"][0])
    per_stage = make_optimizer(config, ticks_per_epoch=10)
    assert [first_update(o) for o in per_stage] == pytest.approx([-0.1 / 7, -0.1 / 5, -0.1 / 3, -0.1])
    off = config_from_args(build_parser().parse_args(["--staleness-power", "0"]))
    assert off.staleness_power == 0.0 and off.staleness_warmup == 0
    assert first_update(make_optimizer(dataclasses.replace(config, staleness_power=0.0), 10)) == pytest.approx(-0.1)
    bp = dataclasses.replace(config, algorithm="bp", stages=1)
    assert first_update(make_optimizer(bp, 10)) == pytest.approx(-0.1)
