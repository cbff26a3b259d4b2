"""Stochastic staleness: the delay model, the fixed schedule as its special case (equal to the
fixed-delay emulator), and random delays against a reference written from the rules with full histories."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import toy

import fdbp_jax as fj


def test_delay_model_draws_within_bounds_and_is_seedable():
    model = fj.DelayModel(num_stages=4, max_extra=3, seed=7)
    draws = np.stack([np.asarray(model(jnp.int32(t))) for t in range(200)])
    minimum = np.array([6, 4, 2, 0])
    assert model.bound == 9
    assert (draws >= minimum).all() and (draws <= minimum + 3).all()
    assert {int(v) for v in np.unique(draws - minimum)} == {0, 1, 2, 3}, "every extra delay should occur"
    again = np.stack([np.asarray(fj.DelayModel(4, 3, seed=7)(jnp.int32(t))) for t in range(200)])
    other = np.stack([np.asarray(fj.DelayModel(4, 3, seed=8)(jnp.int32(t))) for t in range(200)])
    np.testing.assert_array_equal(draws, again)
    assert (draws != other).any()
    # never slow: the fixed schedule; fixed model: the schedule at every tick
    never = np.stack([np.asarray(fj.DelayModel(4, 3, slow_probability=0.0)(jnp.int32(t))) for t in range(20)])
    assert (never == minimum).all()
    assert np.asarray(fj.DelayModel(4)(jnp.int32(5))).tolist() == [fj.stage_delay(k, 4) for k in range(4)]
    assert fj.DelayModel(4).bound == 6


@pytest.mark.parametrize(
    "kwargs,message",
    [(dict(num_stages=0), "num_stages"), (dict(num_stages=2, max_extra=-1), "max_extra"),
     (dict(num_stages=2, slow_probability=1.5), "slow_probability")],
)
def test_delay_model_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fj.DelayModel(**kwargs)


def test_trainer_rejects_delays_where_they_cannot_run():
    stages = toy.conv_stages(2)
    with pytest.raises(ValueError, match="mesh engine keeps the fixed schedule"):
        fj.Trainer(stages, toy.cross_entropy, optax.sgd(0.1), mesh=fj.make_mesh(1, 2), delays=fj.DelayModel(2))
    with pytest.raises(ValueError, match="emulator only"):
        fj.Trainer(stages, toy.cross_entropy, optax.sgd(0.1), algorithm="bp", delays=fj.DelayModel(2))
    with pytest.raises(ValueError, match="delay model is for 3 stages"):
        fj.Trainer(stages, toy.cross_entropy, optax.sgd(0.1), delays=fj.DelayModel(3))
    with pytest.raises(ValueError, match="DelayModel"):
        fj.Trainer(stages, toy.cross_entropy, optax.sgd(0.1), delays=[6, 4, 2, 0])


@pytest.mark.parametrize(
    "num_stages,replicas,batch_norm,shrink",
    [(1, 1, False, 1.0), (2, 2, True, 1.0), (4, 2, True, 0.5)],
)
def test_fixed_delay_model_is_the_fdbp_schedule(num_stages, replicas, batch_norm, shrink):
    """max_extra = 0 gives the pipeline's gradients exactly: same weights and losses as the emulator."""
    xs, ys = toy.batches(3 * num_stages + 2)
    stages = toy.conv_stages(num_stages, batch_norm)
    optimizer = lambda: optax.sgd(0.05, momentum=0.9)
    fixed = fj.Trainer(stages, toy.cross_entropy, optimizer(), shrink=shrink, replicas=replicas)
    state = fixed.init(jax.random.key(1), xs[0])
    initial = fixed.stage_variables(state)
    stochastic = fj.Trainer(stages, toy.cross_entropy, optimizer(), shrink=shrink, replicas=replicas,
                            delays=fj.DelayModel(num_stages, max_extra=0))
    stochastic_state = stochastic.init(jax.random.key(5), xs[0], variables=initial)
    state, fixed_losses = toy.run(fixed, state, xs, ys)
    stochastic_state, stochastic_losses = toy.run(stochastic, stochastic_state, xs, ys)
    expected, got = fixed.stage_variables(state), stochastic.stage_variables(stochastic_state)
    assert toy.max_relative_error(expected, initial) > 1e-3, "training did not move the weights"
    assert toy.max_relative_error(expected, got) <= 1e-5
    np.testing.assert_allclose(stochastic_losses, fixed_losses, rtol=1e-5)


def random_delay_reference(stages, variables, xs, ys, delays, lr, shrink):
    """The rules with full histories: stage k at tick t applies the gradient of the forward it ran
    delays[t][k] ticks earlier, through the weights each later stage had when it ran that batch."""
    K = len(stages)
    apply = lambda k, w, h: stages[k].apply({"params": w}, h)
    weights = [[v["params"]] for v in variables]  # weights[k][t]: params at the start of tick t
    inputs = {}  # (k, batch) -> the input stage k's forward took
    for t in range(len(xs)):
        for k in range(K):
            b = t - k
            if b >= 0:
                inputs[k, b] = xs[b] if k == 0 else apply(k - 1, weights[k - 1][b + k - 1], inputs[k - 1, b])
        for k in range(K):
            b = t - delays[t][k] - k
            w = weights[k][t]
            if b < 0:
                weights[k].append(w)
                continue

            def loss_of(w_k, k=k, b=b):
                h = apply(k, w_k, inputs[k, b])
                for j in range(k + 1, K):
                    h = apply(j, weights[j][b + j], h)
                return toy.cross_entropy(h, ys[b])

            grad = jax.grad(loss_of)(weights[k][b + k])
            weights[k].append(jax.tree.map(lambda p, g: p - lr * shrink ** (K - 1 - k) * g, w, grad))
    return [w[-1] for w in weights]


def test_random_delays_match_history_reference():
    K = 3
    stages = [toy.FlattenDense(16), toy.FlattenDense(12), toy.DenseHead()]
    xs, ys = toy.batches(16, batch=4)
    model = fj.DelayModel(K, max_extra=3, slow_probability=0.7, seed=3)
    trainer = fj.Trainer(stages, toy.cross_entropy, optax.sgd(0.2), shrink=0.5, delays=model)
    state = trainer.init(jax.random.key(3), xs[0])
    initial = trainer.stage_variables(state)
    delays = []
    for x, y in zip(xs, ys):
        state, metrics = trainer.step(state, x, y)
        delays.append(np.asarray(metrics["delays"]).tolist())
    assert any(d != [4, 2, 0] for d in delays), "the model should have drawn some extra delay"
    expected = random_delay_reference(stages, initial, jnp.asarray(xs), jnp.asarray(ys), delays, 0.2, 0.5)
    got = [v["params"] for v in trainer.stage_variables(state)]
    assert toy.max_relative_error(expected, got) <= 1e-5
    fixed = fj.Trainer(stages, toy.cross_entropy, optax.sgd(0.2), shrink=0.5)
    fixed_state, _ = toy.run(fixed, fixed.init(jax.random.key(0), xs[0], variables=initial), xs, ys)
    assert toy.max_relative_error(got, [v["params"] for v in fixed.stage_variables(fixed_state)]) > 1e-4
