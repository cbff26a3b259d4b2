"""XLA:CPU's fast convolutions (`engines/_cpu_convolutions.py`): the same gradients, weight gradients as
sums over batch chunks, and the mesh engines that run them equal to their references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import toy
from jax import lax

import fdbp_jax as fj
from fdbp_jax.engines import _mesh_layer, bp
from fdbp_jax.engines._cpu_convolutions import WEIGHT_GRAD_CHUNK, cpu_convolutions


def conv_loss(stride, padding, layout, groups=1):
    dimension_numbers = {"NHWC": ("NHWC", "HWIO", "NHWC"), "NCHW": ("NCHW", "OIHW", "NCHW")}[layout]

    def loss(x, w):
        y = lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=dimension_numbers,
                                     feature_group_count=groups)
        return jnp.sum(jnp.tanh(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)

    return loss


def operands(batch, layout, channels=6, groups=1, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, 9, 9, channels)).astype(np.float32)
    w = rng.normal(size=(3, 3, channels // groups, 4)).astype(np.float32) / 3
    if layout == "NCHW":
        return jnp.asarray(x.transpose(0, 3, 1, 2)), jnp.asarray(w.transpose(3, 2, 0, 1))
    return jnp.asarray(x), jnp.asarray(w)


def assert_close(got, expected):
    """Equal up to float32 summation order: within 1e-5 of each array's largest entry."""
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(b).max()))


def convolutions(fn, *args) -> int:
    return jax.jit(fn).lower(*args).as_text().count("stablehlo.convolution")


@pytest.mark.parametrize("stride,padding,layout", [(1, "SAME", "NHWC"), (2, "SAME", "NHWC"), (2, "VALID", "NCHW")])
def test_weight_gradients_summed_over_chunks_equal_the_whole(stride, padding, layout):
    batch = 2 * WEIGHT_GRAD_CHUNK + 8  # chunks of 16, 16 and 8 examples
    x, w = operands(batch, layout)
    grads = jax.grad(conv_loss(stride, padding, layout), argnums=(0, 1))
    fast = cpu_convolutions(grads)
    assert_close(jax.jit(fast)(x, w), jax.jit(grads)(x, w))
    # forward, input gradient and one weight gradient; rewritten, the weight gradient is three convs
    assert convolutions(grads, x, w) == 3
    assert convolutions(fast, x, w) == 2 + 3


@pytest.mark.parametrize("batch,groups", [(WEIGHT_GRAD_CHUNK, 1), (2 * WEIGHT_GRAD_CHUNK + 8, 2)])
def test_one_chunk_and_grouped_convolutions_stay_whole(batch, groups):
    x, w = operands(batch, "NHWC", groups=groups)
    grads = jax.grad(conv_loss(1, "SAME", "NHWC", groups), argnums=(0, 1))
    fast = cpu_convolutions(grads)
    assert_close(jax.jit(fast)(x, w), jax.jit(grads)(x, w))
    assert convolutions(fast, x, w) == convolutions(grads, x, w) == 3


@pytest.mark.parametrize("algorithm,mesh", [("fdbp", (1, 2)), ("bp", (2, 1))])
def test_mesh_engines_with_chunked_weight_gradients_match_their_references(algorithm, mesh, monkeypatch):
    """Per-device batches of 40 (three chunks) with BatchNorm: the mesh equals the single-device reference."""
    stages = toy.conv_stages(2, batch_norm=True)
    xs, ys = toy.batches(5, batch=40 * mesh[0])
    reference = fj.Trainer(stages, toy.cross_entropy, optax.sgd(0.05, momentum=0.9), replicas=mesh[0],
                           algorithm=algorithm)
    state = reference.init(jax.random.key(1), xs[0])
    initial = reference.stage_variables(state)

    def mesh_trainer():
        trainer = fj.Trainer(stages, toy.cross_entropy, optax.sgd(0.05, momentum=0.9), mesh=fj.make_mesh(*mesh),
                             algorithm=algorithm)
        trainer_state = trainer.init(jax.random.key(2), xs[0], variables=initial)
        return trainer, trainer_state, convolutions_in(trainer, trainer_state, xs[0], ys[0])

    with monkeypatch.context() as patch:
        for module in (_mesh_layer, bp):
            patch.setattr(module, "fast_convolutions", lambda fn, platform: fn)
        _, _, whole = mesh_trainer()
    engine, mesh_state, chunked = mesh_trainer()
    assert chunked > whole, "no weight gradient was cut into chunks: the test does not test them"
    state, losses = toy.run(reference, state, xs, ys)
    mesh_state, mesh_losses = toy.run(engine, mesh_state, xs, ys)
    assert toy.max_relative_error(reference.stage_variables(state), engine.stage_variables(mesh_state)) <= 1e-5
    np.testing.assert_allclose(mesh_losses, losses, rtol=1e-5)


def convolutions_in(trainer, state, x, y) -> int:
    return trainer.engine.lower(state, x, y).as_text().count("stablehlo.convolution")


def reduce_precisions(fn, *args) -> int:
    return str(jax.make_jaxpr(fn)(*args)).count("reduce_precision")


def test_selective_stash_residual_markers_are_dropped_for_float32_and_kept_where_they_round():
    """jax.checkpoint marks each saved residual with a reduce_precision to its own precision (XLA:CPU
    copies the array for it): the CPU re-trace drops that no-op for float32, keeps real roundings, and
    keeps the marks on bfloat16 (which XLA:CPU may compute wider)."""
    x, w = operands(4, "NHWC")
    selective = jax.checkpoint(conv_loss(1, "SAME", "NHWC"), policy=jax.checkpoint_policies.dots_saveable)
    forward = lambda x, w: jax.vjp(selective, x, w)  # what the stash keeps: the conv output
    assert reduce_precisions(forward, x, w) > 0
    assert reduce_precisions(cpu_convolutions(forward), x, w) == 0
    (expected, pullback), (got, fast_pullback) = forward(x, w), jax.jit(cpu_convolutions(forward))(x, w)
    assert_close([got, *fast_pullback(1.0)], [expected, *pullback(1.0)])
    rounding = lambda a: lax.reduce_precision(a * 3, exponent_bits=5, mantissa_bits=10) + 1  # float16's grid
    assert reduce_precisions(cpu_convolutions(rounding), x) == 1
    np.testing.assert_array_equal(cpu_convolutions(rounding)(x), rounding(x))
    wide = lambda a: lax.reduce_precision(a * 3, exponent_bits=8, mantissa_bits=7)  # bfloat16's own, kept
    assert reduce_precisions(cpu_convolutions(wide), x.astype(jnp.bfloat16)) == 1
