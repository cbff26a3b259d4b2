"""bfloat16 compute: messages between stages in bfloat16 (half the bytes), parameters, gradients and
optimizer state in float32, training close to float32."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fdbp_jax as fj
from fdbp_jax.stages import Stage

from toy import batches, conv_stages, cross_entropy, run


def trained(compute_dtype, mesh_shape=(2, 2), ticks=6):
    xs, ys = batches(ticks, batch=16)
    trainer = fj.Trainer(conv_stages(2, batch_norm=True), cross_entropy, optax.sgd(0.05, momentum=0.9),
                         mesh=fj.make_mesh(*mesh_shape), compute_dtype=compute_dtype)
    state, losses = run(trainer, trainer.init(jax.random.key(0), xs[0]), xs, ys)
    return trainer, state, losses


def test_bfloat16_messages_are_half_the_bytes_and_state_stays_float32():
    full_trainer, full_state, full_losses = trained("float32")
    half_trainer, half_state, half_losses = trained("bfloat16")
    assert half_trainer.engine.packed.message_dtype == jnp.bfloat16
    assert all(m.dtype == jnp.bfloat16 for m in half_state.messages) and half_state.messages
    assert sum(m.nbytes for m in half_state.messages) * 2 == sum(m.nbytes for m in full_state.messages)
    for tree in (half_state.params, half_state.opt_state, half_state.model_state):
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(tree))
    np.testing.assert_allclose(half_losses[1:], full_losses[1:], rtol=0.05)  # the same training, rounded


def test_stage_computes_in_bfloat16_and_returns_float32_gradients():
    stage = Stage(conv_stages(4)[0], jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 3)), jnp.float32)
    variables = stage.init(jax.random.key(0), x)
    y, _ = stage.apply(variables["params"], {}, x, train=True)
    grads = jax.grad(lambda p: jnp.sum(stage.apply(p, {}, x, train=True)[0].astype(jnp.float32)))(variables["params"])
    assert y.dtype == jnp.bfloat16 and all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_unknown_compute_dtype_is_refused():
    with pytest.raises(ValueError, match="compute_dtype='float16' is not known"):
        fj.Trainer(conv_stages(2), cross_entropy, optax.sgd(0.1), compute_dtype="float16")


@pytest.mark.parametrize("algorithm", ["fdbp", "bp"])
def test_the_loss_sees_float32_logits_under_bfloat16_whatever_loss_fn_is_given(algorithm):
    seen = []

    def loss_fn(logits, labels):  # a user's loss that would compute in whatever dtype it is given
        seen.append(logits.dtype)
        return cross_entropy(logits, labels)

    xs, ys = batches(3, batch=8)
    trainer = fj.Trainer(conv_stages(2), loss_fn, optax.sgd(0.05), compute_dtype="bfloat16", algorithm=algorithm)
    run(trainer, trainer.init(jax.random.key(0), xs[0]), xs, ys)
    assert seen and set(seen) == {jnp.dtype(jnp.float32)}
