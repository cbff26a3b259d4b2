"""flax.nnx stages through the public `Trainer`, against an independent sequential reference of FDBP
written with nnx's own split/merge and full histories (no ring buffers, no engine code): BatchNorm
state, dropout keys and a pytree stage boundary included; and dropout in linen stages."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import toy
from flax import nnx

import fdbp_jax as fj
from fdbp_jax.stages import stream_key

SEED, LR, SHRINK = 5, 0.1, 0.5


class MaskedConv(nnx.Module):
    """Stage 0: conv, BatchNorm, dropout; sends a pytree: the activation and a boolean mask."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=rngs)
        self.norm = nnx.BatchNorm(4, momentum=0.8, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)

    def __call__(self, x):
        return {"h": self.drop(nnx.relu(self.norm(self.conv(x)))), "mask": x[..., 0] > 0}


class MaskedDense(nnx.Module):
    """Stage 1: takes the pytree, applies the mask, flattens to a dense layer with dropout."""

    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(8 * 8 * 4, 16, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)

    def __call__(self, inputs):
        h = inputs["h"] * inputs["mask"][..., None]
        return self.drop(nnx.tanh(self.dense(h.reshape(h.shape[0], -1))))


def masked_stages() -> list[nnx.Module]:
    rngs = nnx.Rngs(0)
    return [MaskedConv(rngs), MaskedDense(rngs), nnx.Linear(16, 10, rngs=rngs)]


def reference_key(stage: int, batch: int) -> jax.Array:
    """The documented key of stage k's forward of batch b on replica 0 (micro-batch 0)."""
    key = jax.random.key(SEED)
    for part in (stage, batch, 0, 0):
        key = jax.random.fold_in(key, part)
    return key


def forward_of(module):
    """(params, state, x, key) -> (output, new state): one training forward of an nnx module from its
    parts, its dropout streams reseeded from `key` (jitted: the reference runs it many times)."""
    graphdef, _, rng_state, _ = nnx.split(module, nnx.Param, nnx.RngState, ...)
    names = {v.tag for v in jax.tree.leaves(rng_state, is_leaf=lambda v: isinstance(v, nnx.Variable))
             if isinstance(v, nnx.RngKey)}

    @jax.jit
    def run(params, state, x, key):
        model = nnx.merge(graphdef, params, rng_state, state, copy=True)
        model.train()
        nnx.reseed(model, **{name: stream_key(key, name) for name in names})
        return model(x), nnx.split(model, nnx.Param, nnx.RngState, ...)[3]

    return run


def shrunk(gradient):
    """beta times an input-gradient leaf (a boolean mask's is float0: nothing to scale)."""
    return gradient if gradient.dtype == jax.dtypes.float0 else SHRINK * gradient


def history_reference(modules, xs, ys):
    """FDBP from the rules, N = 1, SGD: every stage's (params, state) at every tick, every forward's
    input, the tick each gradient was sent. Returns each stage's final params and state."""
    K = len(modules)
    run = [forward_of(m) for m in modules]
    parts = [nnx.split(m, nnx.Param, nnx.RngState, ...) for m in modules]
    params = [[p] for _, p, _, _ in parts]  # params[k][t]: at the start of tick t
    states = [[s] for _, _, _, s in parts]
    inputs, outputs, sent = {}, {}, {}
    for t in range(len(xs)):
        grads = [None] * K
        new_states = [states[k][t] for k in range(K)]
        for k in range(K):
            b = t - k
            if b < 0:
                continue
            inputs[k, b] = xs[b] if k == 0 else outputs[k - 1, b]
            outputs[k, b], new_states[k] = run[k](params[k][t], states[k][t], inputs[k, b], reference_key(k, b))
        b = t - (K - 1)
        if b >= 0:
            def loss_of(p, h):
                logits, _ = run[K - 1](p, states[K - 1][t], h, reference_key(K - 1, b))
                return toy.cross_entropy(logits, ys[b])

            grads[K - 1], input_grad = jax.grad(loss_of, argnums=(0, 1))(params[K - 1][t], inputs[K - 1, b])
            sent[K - 1, b] = (t, input_grad)
        for k in range(K - 1):
            b = t - 2 * (K - 1) + k
            if b < 0:
                continue
            sent_tick, output_grad = sent[k + 1, b]
            assert sent_tick == t - 1
            ran = b + k  # the tick stage k ran batch b's forward: its params, state and input
            _, vjp = jax.vjp(lambda p, h: run[k](p, states[k][ran], h, reference_key(k, b))[0],
                             params[k][ran], inputs[k, b])
            grads[k], input_grad = vjp(jax.tree.map(shrunk, output_grad))
            sent[k, b] = (t, input_grad)
        for k in range(K):
            p = params[k][t]
            params[k].append(p if grads[k] is None else jax.tree.map(lambda w, g: w - LR * g, p, grads[k]))
            states[k].append(new_states[k])
    return [nnx.merge_state(p[-1], s[-1]) for p, s in zip(params, states)]


@pytest.mark.parametrize("mesh", [None, (1, 3)])
def test_nnx_stages_match_an_independent_sequential_reference(mesh):
    xs, ys = toy.batches(7, batch=4)
    modules = masked_stages()
    before = jax.tree.map(np.array, nnx.state(modules[0], nnx.Param))
    trainer = fj.Trainer(modules, toy.cross_entropy, optax.sgd(LR), shrink=SHRINK, dropout_seed=SEED,
                         mesh=None if mesh is None else fj.make_mesh(*mesh))
    state = trainer.init(jax.random.key(0), xs[0])
    state, losses = toy.run(trainer, state, xs, ys)
    got = trainer.stage_variables(state)
    assert all(isinstance(v, nnx.State) for v in got)
    expected = history_reference(masked_stages(), jnp.asarray(xs), jnp.asarray(ys))
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    assert toy.max_relative_error(expected, got) <= 1e-5
    assert toy.max_relative_error(expected[0]["norm"]["mean"], nnx.state(masked_stages()[0])["norm"]["mean"]) > 0
    assert np.isfinite(losses[2:]).all()
    # the modules passed in are left as they were: training works on copies
    assert toy.max_relative_error(before, nnx.state(modules[0], nnx.Param)) == 0.0


def test_stage_variables_load_into_the_modules_with_nnx_update():
    """stage_variables -> nnx.update: the modules then compute what `predict` computes (eval mode)."""
    xs, ys = toy.batches(6, batch=8)
    modules = toy.nnx_conv_stages(batch_norm=True, dropout=0.3)
    trainer = fj.Trainer(modules, toy.cross_entropy, optax.sgd(0.05), mesh=fj.make_mesh(2, 4))
    state, _ = toy.run(trainer, trainer.init(jax.random.key(0), xs[0]), xs, ys)
    for module, variables in zip(modules, trainer.stage_variables(state)):
        nnx.update(module, variables)
        module.eval()
    h = jnp.asarray(xs[0])
    for module in modules:
        h = module(h)
    np.testing.assert_allclose(np.asarray(h), np.asarray(trainer.predict(state, xs[0])), rtol=1e-4, atol=1e-5)
    # and init takes them back: the same state, so the same next step
    again = trainer.init(jax.random.key(1), xs[0], variables=trainer.stage_variables(state))
    assert toy.max_relative_error(trainer.stage_variables(again), trainer.stage_variables(state)) == 0.0


class DropoutDense(nn.Module):
    """A linen stage with dropout: it needs a "dropout" key while training."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
        return nn.Dropout(0.5, deterministic=not train)(h)


def test_dropout_keys_are_the_forwards_own_in_every_engine():
    """With dropout, FDBP K=1 equals BP (the same keys per batch and replica), the recompute stash
    equals the residual and selective ones (a re-run forward draws its own mask again), the mesh equals the
    emulator, and dropout really drops (the loss differs from the deterministic network's)."""
    xs, ys = toy.batches(5, batch=8)

    def losses(algorithm, stages, mesh=None, **options):
        trainer = fj.Trainer(stages, toy.cross_entropy, optax.sgd(0.1), algorithm=algorithm, mesh=mesh, **options)
        state, step_losses = toy.run(trainer, trainer.init(jax.random.key(0), xs[0]), xs, ys)
        return step_losses, trainer.stage_variables(state)

    fdbp, _ = losses("fdbp", [DropoutDense(), toy.DenseHead()], replicas=2)
    assert np.isfinite(fdbp[1:]).all()
    k1, _ = losses("fdbp", [_Whole()], replicas=2)
    bp, _ = losses("bp", [_Whole()], replicas=2)
    np.testing.assert_allclose(k1, bp, rtol=1e-6)
    mesh_recompute, v_recompute = losses("fdbp", [DropoutDense(), toy.DenseHead()], mesh=fj.make_mesh(2, 2))
    np.testing.assert_allclose(mesh_recompute, fdbp, rtol=1e-5)
    for stash in ("residuals", "selective"):  # "selective" re-runs the dropout from the stashed key's bits
        mesh_stash, v_stash = losses("fdbp", [DropoutDense(), toy.DenseHead()], mesh=fj.make_mesh(2, 2), stash=stash)
        np.testing.assert_allclose(mesh_stash, mesh_recompute, rtol=1e-5)
        assert toy.max_relative_error(v_recompute, v_stash) <= 1e-5
    deterministic, _ = losses("fdbp", [_Whole(rate=0.0)], replicas=2)
    assert np.abs(deterministic - k1).max() > 1e-3


class _Whole(nn.Module):
    rate: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(nn.Dropout(self.rate, deterministic=not train)(h))


def test_pytree_boundaries_in_the_synchronous_pipelines_equal_bp():
    """A boundary that is a dict of an activation and a boolean mask, packed for the mesh: GPipe and
    1F1B on the mesh equal BP (no dropout, BatchNorm batch = micro-batch so M = 1)."""
    xs, ys = toy.batches(3, batch=8)
    stages = lambda: [_MaskedLinen(), _UseMask(), toy.DenseHead()]
    results = []
    for algorithm, mesh in (("bp", None), ("gpipe", fj.make_mesh(2, 3)), ("1f1b", fj.make_mesh(2, 3))):
        trainer = fj.Trainer(stages(), toy.cross_entropy, optax.sgd(0.1), algorithm=algorithm, mesh=mesh,
                             replicas=2 if mesh is None else None)
        state = trainer.init(jax.random.key(0), xs[0])
        state, step_losses = toy.run(trainer, state, xs, ys)
        results.append((step_losses, trainer.stage_variables(state)))
    for step_losses, variables in results[1:]:
        np.testing.assert_allclose(step_losses, results[0][0], rtol=1e-5)
        assert toy.max_relative_error(results[0][1], variables) <= 1e-5


class _MaskedLinen(nn.Module):
    @nn.compact
    def __call__(self, x):
        return {"h": nn.relu(nn.Conv(4, (3, 3))(x)), "mask": x[..., :1] > 0}


class _UseMask(nn.Module):
    @nn.compact
    def __call__(self, inputs):
        h = inputs["h"] * inputs["mask"]
        return nn.tanh(nn.Dense(16)(h.reshape(h.shape[0], -1)))


def test_bad_stages_and_variables_get_one_clear_line():
    with pytest.raises(ValueError, match="flax.nnx or flax.linen Modules"):
        fj.Trainer([lambda x: x], toy.cross_entropy, optax.sgd(0.1))
    trainer = fj.Trainer(toy.nnx_conv_stages(), toy.cross_entropy, optax.sgd(0.1))
    xs, ys = toy.batches(4, batch=4)
    with pytest.raises(ValueError, match="must be an nnx.State"):
        trainer.init(jax.random.key(0), xs[0], variables=[np.zeros(3)] * 4)
    mixed = [toy.nnx_conv_stages()[0], toy.ConvStage(8, 2), toy.FlattenDense(16), toy.DenseHead()]
    trainer = fj.Trainer(mixed, toy.cross_entropy, optax.sgd(0.1))  # linen and nnx stages may mix
    assert np.isfinite(toy.run(trainer, trainer.init(jax.random.key(0), xs[0]), xs, ys)[1][3:]).all()
    wrong = fj.Trainer([toy.nnx_conv_stages()[0], toy.nnx_conv_stages()[3]], toy.cross_entropy, optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"stage 1 \(Linear\) cannot take the output of stage 0: got shape \(4, 8, 8, 4\)"):
        wrong.init(jax.random.key(0), xs[0])
