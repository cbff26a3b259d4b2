"""Staleness corrections: every FDBP engine with a correction against a reference written from the
correction's own rule (full weight histories, no rings or slots), combined with the staleness control
and gradient shrinking; the look-ahead's own algebra; and bad settings."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import toy

import fdbp_jax as fj
from fdbp_jax.corrections import Lookahead, delay_nesterov
from fdbp_jax.optim import staleness_aware

LR, SHRINK, MOMENTUM, TICKS = 0.2, 0.5, 0.9, 10


def corrected_reference(stages, variables, xs, ys, correction):
    """FDBP with the staleness control (stage k's step lr / (1 + delay_k)) and a correction, from the
    rules: "predict" runs stage k's forward of tick t on w_t + delay_k * (the update it applied last)
    and backpropagates through those weights; "lookahead" applies u = -lr_k g through the trace
    m <- mu m + u as mu^(1+delay) m + (1 - mu^(1+delay)) / (1 - mu) u."""
    K = len(stages)
    delay = [fj.stage_delay(k, K) for k in range(K)]
    apply = lambda k, w, h: stages[k].apply({"params": w}, h)
    tree = lambda f, *trees: jax.tree.map(f, *trees)
    weights = [v["params"] for v in variables]
    last_update = [tree(jnp.zeros_like, w) for w in weights]
    trace = [tree(jnp.zeros_like, w) for w in weights]
    ran_with, inputs, outputs, sent = {}, {}, {}, {}  # (k, batch) -> weights / input / output / input-gradient
    for t in range(len(xs)):
        grads = [None] * K
        for k in range(K):
            b = t - k
            if b >= 0:
                w = weights[k]
                if correction == "predict":
                    w = tree(lambda p, u: p + delay[k] * u, w, last_update[k])
                ran_with[k, b] = w
                inputs[k, b] = xs[b] if k == 0 else outputs[k - 1, b]
                outputs[k, b] = apply(k, w, inputs[k, b])
        b = t - (K - 1)
        if b >= 0:
            loss_of = lambda w, h: toy.cross_entropy(apply(K - 1, w, h), ys[b])
            grads[K - 1], sent[K - 1, b] = jax.grad(loss_of, argnums=(0, 1))(ran_with[K - 1, b], inputs[K - 1, b])
        for k in range(K - 1):
            b = t - 2 * (K - 1) + k
            if b >= 0:
                _, vjp = jax.vjp(lambda w, h: apply(k, w, h), ran_with[k, b], inputs[k, b])
                grads[k], sent[k, b] = vjp(SHRINK * sent[k + 1, b])
        for k in range(K):
            if grads[k] is None:
                continue
            update = tree(lambda g: -LR / (1 + delay[k]) * g, grads[k])
            if correction == "lookahead":
                carry = MOMENTUM ** (1 + delay[k])
                trace[k] = tree(lambda m, u: MOMENTUM * m + u, trace[k], update)
                update = tree(lambda m, u: carry * m + (1 - carry) / (1 - MOMENTUM) * u, trace[k], update)
            last_update[k] = update
            weights[k] = tree(lambda w, u: w + u, weights[k], update)
    return weights


ENGINES = {
    "emulator": dict(mesh=None),
    "stochastic emulator": dict(mesh=None, delays=True),
    "mesh recompute": dict(mesh=(1, 3)),
    "mesh selective": dict(mesh=(1, 3), stash="selective"),
    "mesh residuals": dict(mesh=(1, 3), stash="residuals"),
    "mesh 2 replicas": dict(mesh=(2, 3)),
}
CASES = [("predict", engine) for engine in ENGINES] + [("lookahead", e) for e in ("emulator", "stochastic emulator",
                                                                                  "mesh recompute")]


@pytest.mark.parametrize("correction,engine", CASES)
def test_every_fdbp_engine_follows_the_rule_of_its_correction(correction, engine):
    stages = [toy.FlattenDense(16), toy.FlattenDense(12), toy.DenseHead()]
    settings = ENGINES[engine]
    mesh = None if settings["mesh"] is None else fj.make_mesh(*settings["mesh"])
    chosen = Lookahead(MOMENTUM) if correction == "lookahead" else correction
    trainer = fj.Trainer(stages, toy.cross_entropy, staleness_aware(optax.sgd(LR), len(stages)), mesh=mesh,
                         shrink=SHRINK, stash=settings.get("stash", "recompute"), correction=chosen,
                         delays=fj.DelayModel(len(stages)) if settings.get("delays") else None)
    xs, ys = toy.batches(TICKS, batch=4)
    state = trainer.init(jax.random.key(3), xs[0])
    initial = trainer.stage_variables(state)
    state, _ = toy.run(trainer, state, xs, ys)
    got = [v["params"] for v in trainer.stage_variables(state)]
    expected = corrected_reference(stages, initial, jnp.asarray(xs), jnp.asarray(ys), correction)
    plain = corrected_reference(stages, initial, jnp.asarray(xs), jnp.asarray(ys), "none")
    assert toy.max_relative_error(expected, got) <= 1e-5
    assert toy.max_relative_error(expected, plain) > 1e-3, "the correction changed nothing: the test cannot tell"


def test_look_ahead_of_no_delay_is_nesterov_and_keeps_the_long_run_step():
    params = {"w": jnp.zeros(3)}
    gradients = [jnp.asarray([1.0, -2.0, 0.5]) * (1 + 0.1 * i) for i in range(6)]
    ours, theirs = optax.chain(optax.sgd(0.1), delay_nesterov(MOMENTUM, 0)), optax.sgd(0.1, MOMENTUM, nesterov=True)
    a, b = ours.init(params), theirs.init(params)
    for g in gradients:
        (u, a), (v, b) = ours.update({"w": g}, a), theirs.update({"w": g}, b)
        np.testing.assert_allclose(u["w"], v["w"], rtol=1e-6)
    for delay in (0, 2, 14):  # a constant gradient: every delay's step tends to heavy ball's lr g / (1 - mu)
        look, state = optax.chain(optax.sgd(0.1), delay_nesterov(MOMENTUM, delay)), None
        state = look.init(params)
        for _ in range(300):
            u, state = look.update({"w": jnp.ones(3)}, state)
        np.testing.assert_allclose(u["w"], -0.1 / (1 - MOMENTUM), rtol=1e-5)
    first, _ = optax.chain(optax.sgd(0.1), delay_nesterov(MOMENTUM, 14)).update({"w": jnp.ones(3)}, look.init(params))
    assert float(first["w"][0]) < -0.1 * 5, "a long delay answers a gradient sooner than Nesterov (1.9 lr)"


def test_bad_corrections_fail_clearly():
    stages = [toy.FlattenDense(8), toy.DenseHead()]
    with pytest.raises(ValueError, match="correction='guess' is not known: use one of"):
        fj.Trainer(stages, toy.cross_entropy, optax.sgd(0.1), correction="guess")
    with pytest.raises(ValueError, match="corrects FDBP's stale gradients: use algorithm='fdbp'"):
        fj.Trainer(stages, toy.cross_entropy, optax.sgd(0.1), algorithm="bp", correction="predict")
    with pytest.raises(ValueError, match="momentum"):
        delay_nesterov(1.0, 2)
