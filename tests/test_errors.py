"""Every input mistake the Trainer can detect is one ValueError that names the problem."""

import re

import jax
import numpy as np
import optax
import pytest
import toy
from jax.sharding import Mesh

import fdbp_jax as fj


def trainer(**kwargs):
    args = dict(stages=toy.conv_stages(2), loss_fn=toy.cross_entropy, optimizer=optax.sgd(0.1))
    return fj.Trainer(**{**args, **kwargs})


def test_mesh_stage_size_must_equal_number_of_stages():
    with pytest.raises(ValueError, match=re.escape("mesh has stage=4 but the model has K=2 stages")):
        trainer(mesh=fj.make_mesh(2, 4))


def test_mesh_must_have_data_and_stage_axes():
    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("batch", "model"))
    with pytest.raises(ValueError, match=re.escape("mesh axes are ('batch', 'model'), expected ('data', 'stage')")):
        trainer(mesh=mesh)


def test_more_stages_than_devices():
    with pytest.raises(ValueError, match="needs 16 devices but only 8 cpu device"):
        fj.make_mesh(data=2, stage=8)


@pytest.mark.parametrize("shrink", [0.0, -0.5, 1.5])
def test_shrink_outside_unit_interval(shrink):
    with pytest.raises(ValueError, match=re.escape(f"shrink={shrink!r} must be in (0, 1]")):
        trainer(shrink=shrink)


def test_unknown_algorithm():
    with pytest.raises(ValueError, match="algorithm='sgd' is not known"):
        trainer(algorithm="sgd")


@pytest.mark.parametrize("use_mesh", [False, True])
def test_batch_not_divisible_by_data_size(use_mesh):
    mesh = fj.make_mesh(4, 2) if use_mesh else None
    t = trainer(mesh=mesh, replicas=None if use_mesh else 4)
    with pytest.raises(ValueError, match="global batch 6 is not divisible by the data-parallel size 4"):
        t.init(jax.random.key(0), np.zeros((6, 8, 8, 3), np.float32))


def test_step_batch_must_keep_init_size():
    t = trainer()
    state = t.init(jax.random.key(0), np.zeros((8, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"batch shapes x\(4, 8, 8, 3\), y\(4,\) differ from init's x\(8, 8, 8, 3\)"):
        t.step(state, np.zeros((4, 8, 8, 3), np.float32), np.zeros((4,), np.int32))


def test_stage_output_that_does_not_fit_the_next_stage():
    x = np.zeros((4, 8, 8, 3), np.float32)
    narrow = trainer(stages=[toy.FlattenDense(16), toy.DenseHead()])
    head_for_16 = narrow.stage_variables(narrow.init(jax.random.key(0), x))[1]
    wide = trainer(stages=[toy.FlattenDense(32), toy.DenseHead()])
    first = wide.stage_variables(wide.init(jax.random.key(0), x))[0]
    with pytest.raises(ValueError, match=re.escape("stage 1 (DenseHead) cannot take the output of stage 0: got shape (4, 32)")) as err:
        wide.init(jax.random.key(0), x, variables=[first, head_for_16])
    assert "(16, 10) expects 16 input features" in str(err.value)


def test_variables_must_match_number_of_stages():
    t = trainer()
    with pytest.raises(ValueError, match="variables has 1 entries but there are 2 stages"):
        t.init(jax.random.key(0), np.zeros((4, 8, 8, 3), np.float32), variables=[{}])


def test_loss_must_be_scalar():
    t = trainer(loss_fn=lambda logits, labels: logits)
    with pytest.raises(ValueError, match=r"loss_fn\(logits, labels\) must return a scalar"):
        t.init(jax.random.key(0), np.zeros((4, 8, 8, 3), np.float32))


def test_step_before_init():
    with pytest.raises(ValueError, match=re.escape("call trainer.init(...) before trainer.step(...)")):
        trainer().step(None, np.zeros((4, 8, 8, 3)), np.zeros((4,)))
