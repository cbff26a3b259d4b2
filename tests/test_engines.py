"""The contract every engine meets, one parametrised suite: each engine trains a few steps from the
same variables and batches as its reference (the FDBP emulator for FDBP, `bp` for BP on a mesh and
for the synchronous pipelines) and must end equal to it; the state round-trips the variables; the
caller's arrays survive; the metrics, predictions and compiled step have the shapes the API says."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import optax
import pytest
import toy
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import fdbp_jax as fj
from fdbp_jax.engines import ALGORITHMS, Engine
from fdbp_jax.engines.gpipe import gpipe_order
from fdbp_jax.engines.one_f_one_b import one_f_one_b_order
from fdbp_jax.engines.timetable import BACKWARD, FORWARD, Timetable

STEPS, BATCH, K, N, M = 5, 16, 4, 2, 4


@dataclasses.dataclass(frozen=True)
class Setup:
    """How to build one engine: `mesh` is (data, stage) or None (one device, `replicas` by vmap)."""

    algorithm: str
    mesh: tuple | None = None
    replicas: int | None = None
    microbatches: int = 1
    stochastic: bool = False
    stash: str = "recompute"
    nnx: bool = False  # the same network as flax.nnx stages

    def trainer(self, batch_norm: bool = False) -> fj.Trainer:
        stages = toy.nnx_conv_stages(batch_norm) if self.nnx else toy.conv_stages(K, batch_norm)
        return fj.Trainer(
            stages, toy.cross_entropy, optax.sgd(0.05, momentum=0.9),
            mesh=None if self.mesh is None else fj.make_mesh(*self.mesh), algorithm=self.algorithm,
            replicas=self.replicas, microbatches=self.microbatches, stash=self.stash,
            delays=fj.DelayModel(K) if self.stochastic else None,
        )


# engine -> its reference; without BatchNorm, the pipelines' M micro-batches change no number
CASES = {
    "fdbp emulator": (Setup("fdbp", replicas=N), Setup("fdbp", replicas=N, stochastic=True)),
    "fdbp stochastic emulator": (Setup("fdbp", replicas=N, stochastic=True), Setup("fdbp", replicas=N)),
    "fdbp mesh": (Setup("fdbp", mesh=(N, K)), Setup("fdbp", replicas=N)),
    "fdbp mesh selective stash": (Setup("fdbp", mesh=(N, K), stash="selective"), Setup("fdbp", replicas=N)),
    "bp mesh": (Setup("bp", mesh=(N, K)), Setup("bp", replicas=N * K)),
    "bp emulator": (Setup("bp", replicas=N), Setup("gpipe", replicas=N, microbatches=1)),
    "gpipe emulator": (Setup("gpipe", replicas=N, microbatches=M), Setup("bp", replicas=N)),
    "gpipe mesh": (Setup("gpipe", mesh=(N, K), microbatches=M), Setup("bp", replicas=N)),
    "1f1b emulator": (Setup("1f1b", replicas=N, microbatches=M), Setup("bp", replicas=N)),
    "1f1b mesh": (Setup("1f1b", mesh=(N, K), microbatches=M), Setup("bp", replicas=N)),
}

# every engine again with flax.nnx stages, against its reference with nnx stages
CASES.update({f"{name} nnx": tuple(dataclasses.replace(s, nnx=True) for s in pair) for name, pair in list(CASES.items())})


@functools.lru_cache(maxsize=None)
def reference_run(setup: Setup, batch_norm: bool = False):
    """A reference's run, shared by the engines it is the reference of (never donated: it is not reused)."""
    return train(setup, batch_norm=batch_norm)


def train(setup: Setup, variables=None, batch_norm: bool = False, caller_placed: bool = False):
    """(trainer, final state, per-step losses, the variables it started from, the last metrics, the
    variables as passed). `caller_placed`: pass them already on the engine's devices (replicated on
    its mesh), as a user holding them from another state has them: the case where donation bites
    (and nothing reads the state before the steps: a host view of a buffer blocks its donation)."""
    xs, ys = toy.batches(STEPS, batch=BATCH)
    trainer = setup.trainer(batch_norm)
    if caller_placed:
        where = jax.devices()[0] if trainer.mesh is None else NamedSharding(trainer.mesh, P())
        variables = jax.device_put(variables, where)
    state = trainer.init(jax.random.key(3), xs[0], variables=variables)
    initial = None if caller_placed else trainer.stage_variables(state)
    losses, metrics = [], None
    for x, y in zip(xs, ys):
        state, metrics = trainer.step(state, x, y)
        losses.append(float(metrics["loss"]))
    return trainer, state, np.asarray(losses), initial, metrics, variables


@pytest.mark.parametrize("case", list(CASES))
def test_engine_meets_the_contract_of_its_reference(case):
    setup, reference_setup = CASES[case]
    reference, ref_state, ref_losses, initial, _, _ = reference_run(reference_setup)
    trainer, state, losses, _, metrics, caller = train(setup, variables=initial, caller_placed=True)
    assert isinstance(trainer.engine, Engine)
    # the caller's own arrays: no engine may delete (donate) or alias them
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(caller))
    assert toy.max_relative_error(jax.device_get(caller), initial) == 0.0, "the caller's variables were changed"

    got, expected = trainer.stage_variables(state), reference.stage_variables(ref_state)
    assert jax.tree.structure(got) == jax.tree.structure(initial)
    assert toy.max_relative_error(expected, initial) > 1e-3, "training did not move the weights"
    assert toy.max_relative_error(expected, got) <= 1e-5
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    if setup.algorithm == "fdbp":
        assert np.isnan(losses[: K - 1]).all() and np.isfinite(losses[K - 1 :]).all()
    else:  # synchronous: every step reports its own batch's loss
        assert np.isfinite(losses).all()

    assert set(metrics) >= {"loss", "tick", "nonfinite"} and int(metrics["tick"]) == STEPS - 1
    assert np.asarray(metrics["nonfinite"]).shape == (K,) and not np.asarray(metrics["nonfinite"]).any()
    xs, ys = toy.batches(1, batch=BATCH, seed=7)
    logits = np.asarray(trainer.predict(state, xs[0][:10]))
    assert logits.shape == (10, 10)
    np.testing.assert_allclose(logits, np.asarray(reference.predict(ref_state, xs[0][:10])), rtol=1e-4, atol=1e-5)
    assert "stablehlo" in trainer.engine.lower(state, xs[0], ys[0]).as_text()  # what compiled_step compiles
    restored = trainer.stage_variables(trainer.init(jax.random.key(3), xs[0], variables=initial))
    assert toy.max_relative_error(restored, initial) == 0.0, "init/stage_variables did not round-trip the variables"


def test_pipelines_with_batch_norm_equal_bp_with_a_replica_per_micro_batch():
    """Each micro-batch is normalised by its own statistics: N replicas x M micro-batches is BP
    with N*M replicas, running statistics included (GPipe here; 1F1B shares the engine)."""
    reference, ref_state, ref_losses, initial, _, _ = train(Setup("bp", replicas=N * M), batch_norm=True)
    trainer, state, losses, _, _, _ = train(Setup("gpipe", mesh=(N, K), microbatches=M), initial, batch_norm=True)
    got, expected = trainer.stage_variables(state), reference.stage_variables(ref_state)
    assert toy.max_relative_error(expected[0]["batch_stats"], initial[0]["batch_stats"]) > 1e-3
    assert toy.max_relative_error(expected, got) <= 1e-5
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)


@pytest.mark.parametrize("order", [gpipe_order, one_f_one_b_order])
@pytest.mark.parametrize("stages", [1, 2, 4, 8])
@pytest.mark.parametrize("microbatches", [1, 3, 4, 8, 16])
def test_timetables_take_their_ticks_and_respect_every_dependency(order, stages, microbatches):
    """GPipe: M + K - 1 forward ticks and as many backward ticks, the last stage's forwards included.
    1F1B folds the last stage's forward into its backward, which saves two ticks (one with M = 1)."""
    table = Timetable.from_orders([order(k, stages, microbatches) for k in range(stages)], microbatches)
    folded = order is one_f_one_b_order
    if not folded:
        assert table.ticks == 2 * (microbatches + stages - 1)
    elif stages == 1:
        assert table.ticks == microbatches
    else:
        assert table.ticks == 2 * (microbatches + stages - 2) + (microbatches == 1)
    when = {(k, *op): t for t, row in enumerate(table.ops) for k, op in enumerate(row) if op is not None}
    assert len(when) == (2 * stages - folded) * microbatches
    last = stages - 1
    for m in range(microbatches):
        for k in range(1, stages):
            if not (folded and k == last):
                assert when[(k, FORWARD, m)] > when[(k - 1, FORWARD, m)]
            assert when[(k - 1, BACKWARD, m)] > when[(k, BACKWARD, m)]
        if folded and stages > 1:
            assert when[(last, BACKWARD, m)] > when[(last - 1, FORWARD, m)]
        elif not folded:
            assert when[(last, BACKWARD, m)] > when[(last, FORWARD, m)]
    if stages > 1:  # micro-batches a stage holds at once: all of them in GPipe, at most K in 1F1B
        if folded:
            assert table.buffer_depth <= min(microbatches, stages)
        else:
            assert table.buffer_depth == microbatches


def test_one_f_one_b_holds_fewer_micro_batches_than_gpipe_in_the_compiled_step():
    xs, ys = toy.batches(1, batch=32)
    memory = {}
    for algorithm in ("gpipe", "1f1b"):  # K = 2, M = 8: GPipe holds 8 micro-batches, 1F1B 1
        trainer = fj.Trainer(toy.conv_stages(2), toy.cross_entropy, optax.sgd(0.1), mesh=fj.make_mesh(N, 2),
                             algorithm=algorithm, microbatches=8)
        state = trainer.init(jax.random.key(0), xs[0])
        memory[algorithm] = trainer.compiled_step(state, xs[0], ys[0]).memory_analysis().temp_size_in_bytes
    assert memory["1f1b"] < memory["gpipe"]


def test_registry_and_bad_pipeline_settings_fail_clearly():
    assert {"fdbp", "bp", "gpipe", "1f1b"} <= set(ALGORITHMS) and set(fj.trainer.ALGORITHMS) == set(ALGORITHMS)
    stages, loss, opt = toy.conv_stages(2), toy.cross_entropy, optax.sgd(0.1)
    with pytest.raises(ValueError, match="microbatches=4 applies to the synchronous pipelines"):
        fj.Trainer(stages, loss, opt, algorithm="fdbp", microbatches=4)
    with pytest.raises(ValueError, match="microbatches=0 must be a positive integer"):
        fj.Trainer(stages, loss, opt, algorithm="gpipe", microbatches=0)
    trainer = fj.Trainer(stages, loss, opt, algorithm="1f1b", microbatches=3, replicas=2)
    with pytest.raises(ValueError, match="does not split into 3 micro-batches on each of 2 replicas"):
        trainer.init(jax.random.key(0), toy.batches(1, batch=8)[0][0])
    with pytest.raises(ValueError, match="mesh has stage=1 but the model has K=2"):
        fj.Trainer(stages, loss, opt, algorithm="gpipe", mesh=fj.make_mesh(2, 1))


@pytest.mark.parametrize("setup", [Setup("bp", mesh=(N, K)), Setup("fdbp", mesh=(N, K)),
                                   Setup("gpipe", mesh=(N, K), microbatches=M)])
def test_gradients_are_averaged_in_one_collective_per_dtype(setup):
    """Between processes every collective costs a fixed latency (gloo: ~4 ms), so the gradient tree, the
    model state and the loss are averaged over "data" together, not leaf by leaf (and not at all over
    a "data" axis of one device)."""
    xs, ys = toy.batches(1, batch=BATCH)
    trainer = setup.trainer(batch_norm=True)
    state = trainer.init(jax.random.key(0), xs[0])
    text = trainer.engine.lower(state, xs[0], ys[0]).as_text()
    metrics = 0 if setup.algorithm == "bp" else 1  # the pipelines' loss and flags: one psum along "stage"
    all_reduces = text.count("stablehlo.all_reduce") - metrics
    assert 1 <= all_reduces <= 2, f"{all_reduces} all-reduces in one step"  # one per dtype: float32 (+ int32)
    if setup.algorithm == "fdbp":  # one replica per stage: nothing to average, only the metrics' psum
        single = dataclasses.replace(setup, mesh=(1, K)).trainer(batch_norm=True)
        state = single.init(jax.random.key(0), xs[0])
        assert single.engine.lower(state, xs[0], ys[0]).as_text().count("stablehlo.all_reduce") == 1
