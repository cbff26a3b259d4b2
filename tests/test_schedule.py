"""The delay arithmetic, a hand-computed two-stage run, an independent history-based reference,
and the warm-up: the timing contract, checked so that an off-by-one anywhere fails."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import toy

import fdbp_jax as fj
from fdbp_jax import schedule


def test_delay_arithmetic():
    K = 4
    assert [fj.stage_delay(k, K) for k in range(K)] == [6, 4, 2, 0]
    assert [fj.stash_depth(k, K) for k in range(K)] == [6, 4, 2, 0]
    assert [fj.first_update_tick(k, K) for k in range(K)] == [6, 5, 4, 3]
    # K=3 timing table of the design notes: at tick 5 stage 0 runs F5 and B1, stage 2 runs F3 and B3
    assert [schedule.forward_batch(5, k) for k in range(3)] == [5, 4, 3]
    assert [schedule.backward_batch(5, k, 3) for k in range(3)] == [1, 2, 3]
    # the backward at tick t reads the slot its forward wrote at t - delay, which tick t's forward takes
    # next (read first); no other forward in flight shares a slot
    for k in range(K - 1):
        for t in range(20):
            delay = fj.stage_delay(k, K)
            assert schedule.stash_slot(t - delay, k, K) == schedule.stash_slot(t, k, K)
            in_flight = {schedule.stash_slot(t - d, k, K) for d in range(delay)}
            assert len(in_flight) == delay


def scalar_pipeline(mesh):
    """Two stages h = w0 * x, out = w1 * h; loss 0.5 (out - y)^2; SGD lr 0.1; w0 = w1 = 1."""
    return fj.Trainer([toy.Scalar(), toy.Scalar()], toy.squared_error, optax.sgd(0.1), mesh=mesh)


# Hand computation, batch b is x = b + 1, y = 0 (stage 1 handles batch t-1, stage 0 applies batch t-2):
# tick 0: stage 0 runs F0 (h=1). No updates.
# tick 1: stage 1, batch 0: h=1, out=1: dw1 = out*h = 1 -> w1 = 0.9; sends g = w1*out = 1. loss 0.5
# tick 2: stage 0, batch 0: dw0 = g*x = 1 -> w0 = 0.9.  stage 1, batch 1: h = 1*2 = 2 (w0 of tick 1),
#         out = 0.9*2 = 1.8: dw1 = 3.6 -> w1 = 0.54; g = 0.9*1.8 = 1.62. loss 1.62
# tick 3: stage 0, batch 1: dw0 = 1.62*2 = 3.24 -> w0 = 0.576.  stage 1, batch 2: h = 1*3 = 3 (w0 of
#         tick 2, before its update), out = 1.62: dw1 = 4.86 -> w1 = 0.054; g = 0.54*1.62 = 0.8748. loss 1.3122
# tick 4: stage 0, batch 2: dw0 = 0.8748*3 = 2.6244 -> w0 = 0.31356.  stage 1, batch 3: h = 0.9*4 = 3.6,
#         out = 0.1944: dw1 = 0.69984 -> w1 = -0.015984. loss 0.01889568
# weights after each tick, and the loss each tick reports
HAND_W0 = [1.0, 1.0, 0.9, 0.576, 0.31356]
HAND_W1 = [1.0, 0.9, 0.54, 0.054, -0.015984]
HAND_LOSS = [np.nan, 0.5, 1.62, 1.3122, 0.01889568]


@pytest.mark.parametrize("use_mesh", [False, True])
def test_hand_computed_two_stage_run(use_mesh):
    trainer = scalar_pipeline(fj.make_mesh(1, 2) if use_mesh else None)
    xs = np.arange(1, 6, dtype=np.float32).reshape(5, 1)
    ys = np.zeros((5, 1), np.float32)
    state = trainer.init(jax.random.key(0), xs[0], example_y=ys[0])
    for t in range(5):
        state, metrics = trainer.step(state, xs[t], ys[t])
        w0, w1 = (float(v["params"]["w"]) for v in trainer.stage_variables(state))
        assert int(metrics["tick"]) == t
        np.testing.assert_allclose(float(metrics["loss"]), HAND_LOSS[t], rtol=1e-5)
        np.testing.assert_allclose([w0, w1], [HAND_W0[t], HAND_W1[t]], rtol=1e-5, atol=1e-7)


def history_reference(stages, variables, xs, ys, lr, shrink):
    """FDBP written directly from the rules with full histories (no ring buffers, no slots): the weights
    each stage had at every tick, the input it saw for every batch, the tick each gradient was sent."""
    K = len(stages)
    apply = lambda k, w, h: stages[k].apply({"params": w}, h)
    weights = [[v["params"]] for v in variables]  # weights[k][t]: stage k's params at the start of tick t
    inputs, outputs, sent = {}, {}, {}  # (k, batch) -> input / output / (tick, input-gradient)
    for t in range(len(xs)):
        grads = [None] * K
        for k in range(K):
            b = t - k
            if b >= 0:
                inputs[k, b] = xs[b] if k == 0 else outputs[k - 1, b]
                outputs[k, b] = apply(k, weights[k][t], inputs[k, b])
        b = t - (K - 1)
        if b >= 0:
            loss_of = lambda w, h: toy.cross_entropy(apply(K - 1, w, h), ys[b])
            grads[K - 1], input_grad = jax.grad(loss_of, argnums=(0, 1))(weights[K - 1][t], inputs[K - 1, b])
            sent[K - 1, b] = (t, input_grad)
        for k in range(K - 1):
            b = t - 2 * (K - 1) + k
            if b >= 0:
                sent_tick, output_grad = sent[k + 1, b]
                assert sent_tick == t - 1
                _, vjp = jax.vjp(lambda w, h: apply(k, w, h), weights[k][b + k], inputs[k, b])
                grads[k], input_grad = vjp(shrink * output_grad)
                sent[k, b] = (t, input_grad)
        for k in range(K):
            w = weights[k][t]
            weights[k].append(w if grads[k] is None else jax.tree.map(lambda p, g: p - lr * g, w, grads[k]))
    return [w[-1] for w in weights]


@pytest.mark.parametrize("use_mesh", [False, True])
def test_matches_history_reference(use_mesh):
    stages = [toy.FlattenDense(16), toy.FlattenDense(12), toy.DenseHead()]
    xs, ys = toy.batches(10, batch=4)
    trainer = fj.Trainer(stages, toy.cross_entropy, optax.sgd(0.2), shrink=0.5, mesh=fj.make_mesh(1, 3) if use_mesh else None)
    state = trainer.init(jax.random.key(3), xs[0])
    initial = trainer.stage_variables(state)
    state, _ = toy.run(trainer, state, xs, ys)
    expected = history_reference(stages, initial, jnp.asarray(xs), jnp.asarray(ys), 0.2, 0.5)
    got = [v["params"] for v in trainer.stage_variables(state)]
    assert toy.max_relative_error(expected, got) <= 1e-5
    assert toy.max_relative_error(expected, [v["params"] for v in initial]) > 1e-3


@pytest.mark.parametrize("use_mesh", [False, True])
def test_warm_up_first_update_ticks(use_mesh):
    K = 4
    xs, ys = toy.batches(2 * K, batch=4)
    mesh = fj.make_mesh(2, K) if use_mesh else None
    trainer = fj.Trainer(toy.conv_stages(K), toy.cross_entropy, optax.sgd(0.1), mesh=mesh)
    state = trainer.init(jax.random.key(0), xs[0])
    previous = trainer.stage_variables(state)
    first_change = [None] * K
    for t in range(2 * K):
        state, _ = trainer.step(state, xs[t], ys[t])
        current = trainer.stage_variables(state)
        for k in range(K):
            moved = toy.max_relative_error(previous[k], current[k]) > 0
            if moved and first_change[k] is None:
                first_change[k] = t
        previous = current
    assert first_change == [2 * (K - 1) - k for k in range(K)] == [6, 5, 4, 3]


def test_tick_rules_every_engine_shares():
    """The K=3 picture of the README: who has a forward, who has a gradient, when the loss is valid."""
    K = 3
    forwards = [[schedule.has_forward(t, k) for t in range(6)] for k in range(K)]
    gradients = [[schedule.has_gradient(t, k, K) for t in range(6)] for k in range(K)]
    assert forwards == [[True] * 6, [False] + [True] * 5, [False] * 2 + [True] * 4]
    assert gradients == [[False] * 4 + [True] * 2, [False] * 3 + [True] * 3, [False] * 2 + [True] * 4]
    assert [schedule.loss_is_valid(t, K) for t in range(4)] == [False, False, True, True]
