"""Defects found in review, each pinned by a test that failed before its fix."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fdbp_jax as fj
from fdbp_jax import models, optim
from fdbp_jax.stages import Stage, split_variables

from toy import batches, conv_stages, cross_entropy, run


class Counted(nn.Module):
    """A dense stage that counts its training forwards in an integer collection."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        count = self.variable("counters", "calls", lambda: jnp.zeros((), jnp.int32))
        if train:
            count.value += 1
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("algorithm,mesh_shape", [("fdbp", None), ("fdbp", (2, 2)), ("bp", None), ("bp", (2, 1))])
def test_integer_model_state_keeps_its_dtype_and_value_on_every_engine(algorithm, mesh_shape):
    stages = [conv_stages(4)[0], Counted()] if algorithm == "fdbp" else [Counted()]
    mesh = None if mesh_shape is None else fj.make_mesh(*mesh_shape)
    trainer = fj.Trainer(stages, cross_entropy, optax.sgd(0.1), mesh=mesh, algorithm=algorithm,
                         replicas=2 if mesh is None else None)
    xs, ys = batches(4)
    state, _ = run(trainer, trainer.init(jax.random.key(0), xs[0]), xs, ys)
    calls = trainer.stage_variables(state)[-1]["counters"]["calls"]
    forwards = 4 - (len(stages) - 1)  # the last stage's first forward is at tick K-1
    assert np.asarray(calls).dtype == np.int32 and int(calls) == forwards


class Normalised(nn.Module):
    """A block outside the library's own block types whose BatchNorm needs `train`."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x))


def test_blocks_pass_train_to_any_block_that_takes_it():
    stage = Stage(models.Blocks((Normalised(), models.Head())))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8, 8, 3)), jnp.float32)
    params, state = split_variables(stage.init(jax.random.key(0), x))
    _, new_state = stage.apply(params, state, x, train=True)
    before, after = state["batch_stats"], new_state["batch_stats"]
    assert not np.allclose(jax.tree.leaves(before)[0], jax.tree.leaves(after)[0])  # trained: statistics move


def test_staleness_aware_defaults_to_the_cli_power():
    grads = {"w": jnp.ones(())}
    first = lambda opt: float(opt.update(grads, opt.init(grads), grads)[0]["w"])
    per_stage = optim.staleness_aware(optax.sgd(1.0), 3)
    assert [first(o) for o in per_stage] == pytest.approx([-1 / 5, -1 / 3, -1.0])  # 1 / (1 + 2(K-1-k))


def test_emulated_bp_simulates_the_replicas_of_the_mesh_run(tmp_path):
    from fdbp_jax import train
    from fdbp_jax.config import Config, validate
    from test_train import TINY, tiny_cifar

    config = Config(**{**TINY, "algorithm": "bp", "emulate": True, "epochs": 1})  # K=2 x N=2 devices
    assert config.replicas == 4
    result = train.train_and_evaluate(config, str(tmp_path), datasets=(tiny_cifar(32, 0), tiny_cifar(16, 1)),
                                      show_progress=False)
    assert result.trainer.replicas == 4 == fj.Trainer(conv_stages(1), cross_entropy, optax.sgd(0.1),
                                                     mesh=fj.make_mesh(2, 2), algorithm="bp").replicas
    with pytest.raises(ValueError, match=r"--batch-size 18: must be a positive multiple of the 4 replicas of BP"):
        validate(Config(**{**TINY, "algorithm": "bp", "batch_size": 18}))
