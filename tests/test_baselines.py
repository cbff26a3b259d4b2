"""BP baseline and the invariances tying FDBP to it: K = 1 is plain data-parallel SGD, the mesh BP
equals the single-device BP, and without BatchNorm the replica count does not change FDBP."""

import jax
import numpy as np
import optax
import pytest
import toy

import fdbp_jax as fj


def train(stages, algorithm, mesh=None, replicas=None, variables=None, ticks=6, optimizer=None):
    xs, ys = toy.batches(ticks)
    trainer = fj.Trainer(
        stages, toy.cross_entropy, optimizer or optax.sgd(0.05, momentum=0.9), mesh=mesh, algorithm=algorithm,
        replicas=replicas,
    )
    state = trainer.init(jax.random.key(5), xs[0], variables=variables)
    initial = trainer.stage_variables(state)
    state, losses = toy.run(trainer, state, xs, ys)
    return trainer.stage_variables(state), losses, initial


@pytest.mark.parametrize("data", [2])
@pytest.mark.parametrize("use_mesh", [False, True])
def test_single_stage_fdbp_is_backprop(data, use_mesh):
    stages = toy.conv_stages(1, batch_norm=True)
    mesh = (lambda: fj.make_mesh(data, 1)) if use_mesh else (lambda: None)
    replicas = None if use_mesh else data
    bp, bp_losses, initial = train(stages, "bp", mesh(), replicas, optimizer=optax.adam(1e-2))
    fdbp, fdbp_losses, _ = train(stages, "fdbp", mesh(), replicas, variables=initial, optimizer=optax.adam(1e-2))
    assert toy.max_relative_error(bp, initial) > 1e-3
    assert toy.max_relative_error(bp, fdbp) <= 1e-6
    np.testing.assert_allclose(fdbp_losses, bp_losses, rtol=1e-6)


@pytest.mark.parametrize("data,stage", [(2, 4)])  # with BatchNorm; without it, in tests/test_engines.py
def test_mesh_backprop_equals_single_device_backprop(data, stage):
    num_stages = 4 if stage == 4 else 2
    stages = toy.conv_stages(num_stages, batch_norm=True)
    reference, ref_losses, initial = train(stages, "bp", replicas=data * stage)
    got, losses, _ = train(stages, "bp", mesh=fj.make_mesh(data, stage), variables=initial)
    assert "batch_stats" in got[0]
    assert toy.max_relative_error(reference, got) <= 1e-5
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)


def test_fdbp_is_invariant_to_replica_count_without_batch_norm():
    stages = toy.conv_stages(2)
    one, _, initial = train(stages, "fdbp", mesh=fj.make_mesh(1, 2))
    for data in (2, 4):
        got, _, _ = train(stages, "fdbp", mesh=fj.make_mesh(data, 2), variables=initial)
        assert toy.max_relative_error(one, got) <= 1e-5
    emulated, _, _ = train(stages, "fdbp", replicas=4, variables=initial)
    assert toy.max_relative_error(one, emulated) <= 1e-5


def test_multi_stage_fdbp_differs_from_backprop():
    stages = toy.conv_stages(2)
    bp, _, initial = train(stages, "bp")
    fdbp, _, _ = train(stages, "fdbp", variables=initial)
    assert toy.max_relative_error(bp, fdbp) > 1e-3


def test_single_stage_fdbp_tick_has_only_backprop_collectives():
    """K=1 on a mesh moves nothing between stages: its compiled tick holds no collective-permute and no
    more all-reduces than BP's step. On XLA:CPU each collective holds every device at a rendezvous;
    the empty label ppermute and the size-1 metrics psum cost K=1 ~5 % against BP (measured)."""
    xs, ys = toy.batches(1)
    texts = {}
    for algorithm in ("bp", "fdbp"):
        trainer = fj.Trainer(toy.conv_stages(1), toy.cross_entropy, optax.sgd(0.1), mesh=fj.make_mesh(2, 1),
                             algorithm=algorithm)
        state = trainer.init(jax.random.key(0), xs[0])
        texts[algorithm] = trainer.compiled_step(state, xs[0], ys[0]).as_text()
    assert "collective-permute" not in texts["fdbp"]
    assert 1 <= texts["fdbp"].count(" all-reduce(") <= texts["bp"].count(" all-reduce(")
