"""The mesh engine against the single-device emulator, on the same initial variables and batches."""

import re

import jax
import numpy as np
import optax
import pytest
import toy

import fdbp_jax as fj
from fdbp_jax.engines import _mesh_layer, _stash_choice

OPTIMIZERS = {"sgd_momentum": lambda: optax.sgd(0.05, momentum=0.9), "adam": lambda: optax.adam(1e-3)}


def mesh_and_emulator(num_stages, data, optimizer, shrink, batch_norm=False, ticks=None, stash="recompute",
                      stages=None):
    """(emulator, its state, losses), (mesh trainer, its state, losses), the initial variables, the inputs:
    both trained from the same variables on the same batches (`stages`: the toy conv stages by default)."""
    ticks = ticks or 3 * num_stages + 2
    xs, ys = toy.batches(ticks)
    stages = stages or toy.conv_stages(num_stages, batch_norm)
    emulator = fj.Trainer(stages, toy.cross_entropy, OPTIMIZERS[optimizer](), shrink=shrink, replicas=data)
    state = emulator.init(jax.random.key(1), xs[0])
    initial = emulator.stage_variables(state)
    engine = fj.Trainer(
        stages, toy.cross_entropy, OPTIMIZERS[optimizer](), mesh=fj.make_mesh(data, num_stages), shrink=shrink, stash=stash
    )
    mesh_state = engine.init(jax.random.key(99), xs[0], variables=initial)
    state, emulator_losses = toy.run(emulator, state, xs, ys)
    mesh_state, mesh_losses = toy.run(engine, mesh_state, xs, ys)
    return (emulator, state, emulator_losses), (engine, mesh_state, mesh_losses), initial, xs


# (K=4, N=2, SGD) is in the shared contract suite, tests/test_engines.py
@pytest.mark.parametrize("num_stages,data,optimizer,shrink", [
    (1, 1, "sgd_momentum", 1.0), (1, 2, "adam", 0.5), (2, 1, "sgd_momentum", 1.0), (2, 2, "adam", 0.5),
    (4, 2, "adam", 0.5),
])
def test_mesh_engine_matches_emulator(num_stages, data, optimizer, shrink):
    (emulator, state, emu_losses), (engine, mesh_state, mesh_losses), initial, xs = mesh_and_emulator(
        num_stages, data, optimizer, shrink
    )
    expected, got = emulator.stage_variables(state), engine.stage_variables(mesh_state)
    assert jax.tree.structure(expected) == jax.tree.structure(got) == jax.tree.structure(initial)
    assert toy.max_relative_error(expected, initial) > 1e-3, "training did not move the weights"
    assert toy.max_relative_error(expected, got) <= 1e-5
    np.testing.assert_allclose(mesh_losses, emu_losses, rtol=1e-5)
    assert np.isnan(emu_losses[: num_stages - 1]).all() and np.isfinite(emu_losses[num_stages - 1 :]).all()
    np.testing.assert_allclose(engine.predict(mesh_state, xs[0]), emulator.predict(state, xs[0]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_stages,stash", [(2, "recompute"), (4, "recompute"), (4, "residuals")])
def test_batch_norm_stages_match_emulator(num_stages, stash):
    (emulator, state, emu_losses), (engine, mesh_state, mesh_losses), initial, xs = mesh_and_emulator(
        num_stages, 2, "sgd_momentum", 1.0, batch_norm=True, stash=stash
    )
    expected, got = emulator.stage_variables(state), engine.stage_variables(mesh_state)
    assert "batch_stats" in expected[0]
    assert toy.max_relative_error(expected[0]["batch_stats"], initial[0]["batch_stats"]) > 1e-3
    assert toy.max_relative_error(expected, got) <= 1e-5
    np.testing.assert_allclose(mesh_losses, emu_losses, rtol=1e-5)
    np.testing.assert_allclose(engine.predict(mesh_state, xs[1]), emulator.predict(state, xs[1]), rtol=1e-4, atol=1e-5)


CANONICAL_CONV = "[b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]"


@pytest.mark.parametrize("stash", fj.engines.STASH_MODES)
def test_stage_branches_as_accelerators_compile_them_match_emulator(stash, monkeypatch):
    """Without the CPU-only conv rewrite (`engines/_cpu_convolutions.py`) the mesh runs the raw `lax.switch`
    branches a GPU or TPU compiles (non-canonical backward convolutions, slow on CPU, so a tiny model):
    the same numbers as the emulator, for every stash."""
    monkeypatch.setattr(_mesh_layer, "fast_convolutions", lambda branch, platform: branch)
    (emulator, state, emu_losses), (engine, mesh_state, mesh_losses), _, xs = mesh_and_emulator(
        2, 2, "sgd_momentum", 1.0, batch_norm=True, ticks=5, stash=stash
    )
    x, y = toy.batches(1)
    layouts = set(re.findall(r"dim_numbers = (\S+)", engine.engine.lower(mesh_state, x[0], y[0]).as_text()))
    assert layouts - {CANONICAL_CONV}, "the conv rewrite still ran: the raw branches were not tested"
    assert toy.max_relative_error(emulator.stage_variables(state), engine.stage_variables(mesh_state)) <= 1e-5
    np.testing.assert_allclose(mesh_losses, emu_losses, rtol=1e-5)


@pytest.mark.parametrize("data", [2])
def test_residual_stash_matches_emulator_with_adam_and_shrink(data):
    (emulator, state, emu_losses), (engine, mesh_state, mesh_losses), _, _ = mesh_and_emulator(
        4, data, "adam", 0.5, stash="residuals"
    )
    assert toy.max_relative_error(emulator.stage_variables(state), engine.stage_variables(mesh_state)) <= 1e-5
    np.testing.assert_allclose(mesh_losses, emu_losses, rtol=1e-5)


def test_stage_parameters_live_only_on_their_stage_devices():
    xs, _ = toy.batches(1)
    mesh = fj.make_mesh(2, 4)
    trainer = fj.Trainer(toy.conv_stages(4), toy.cross_entropy, optax.sgd(0.1), mesh=mesh)
    state = trainer.init(jax.random.key(0), xs[0])
    for leaf in jax.tree.leaves(state.params):
        for shard in leaf.addressable_shards:
            stage = list(mesh.devices.flat).index(shard.device) % 4
            assert shard.data.shape[0] == 1 and shard.index[0] == slice(stage, stage + 1)


def test_auto_stash_takes_the_fastest_mode_whose_rings_fit(monkeypatch):
    """stash="auto" (the default) runs selective where its rings take at most half of a device's memory,
    else recompute, judged at init from the rings' exact bytes per device: the state's own."""
    sizes = {"selective": 600, "recompute": 100}
    assert _stash_choice.fastest_fitting_stash(sizes.get, 1200) == "selective"
    assert _stash_choice.fastest_fitting_stash(sizes.get, 1199) == "recompute"
    assert _stash_choice.fastest_fitting_stash(lambda mode: 10**15, 1) == "recompute"  # the last, whatever it needs
    xs, _ = toy.batches(1, batch=16)
    build = lambda: fj.Trainer(toy.conv_stages(4), toy.cross_entropy, optax.sgd(0.1), mesh=fj.make_mesh(2, 4))
    trainer = build()
    assert trainer.stash == "auto"
    state = trainer.init(jax.random.key(0), xs[0])
    assert trainer.stash == "selective"  # this host holds it easily
    per_device = sum(ring.addressable_shards[0].data.nbytes for ring in jax.tree.leaves(state.stash))
    assert per_device > 0 and not jax.tree.leaves(state.stash_params)
    for memory, chosen in ((2 * per_device, "selective"), (2 * per_device - 2, "recompute")):
        monkeypatch.setattr(_stash_choice, "device_memory_bytes", lambda device, local, memory=memory: memory)
        trainer = build()
        trainer.init(jax.random.key(0), xs[0])
        assert trainer.stash == chosen
    with pytest.raises(ValueError, match=r"stash='fastest' is not known: use one of \('auto', 'recompute'"):
        fj.Trainer(toy.conv_stages(4), toy.cross_entropy, optax.sgd(0.1), stash="fastest")


@pytest.mark.parametrize("stash, num_stages", [("recompute", 4), ("residuals", 4), ("selective", 2), ("recompute", 2)])
def test_the_compiled_tick_writes_the_stash_rings_in_place(stash, num_stages):
    """Each tick reads one row of every stash ring and writes another: the compiled tick must not copy a
    whole ring (a bounds-checked scatter, a slice of the ring's block, a write free to run before the
    read, or, with K=2, a stage switch of one branch inlined beside the write made XLA copy the rings)."""
    xs, ys = toy.batches(1, batch=16)
    trainer = fj.Trainer(toy.conv_stages(num_stages, True), toy.cross_entropy, optax.sgd(0.1),
                         mesh=fj.make_mesh(8 // num_stages, num_stages), stash=stash)
    state = trainer.init(jax.random.key(0), xs[0])
    rings = jax.tree.leaves((state.stash, state.stash_params, state.stash_model_state))
    shapes = {",".join(map(str, ring.addressable_shards[0].data.shape)) for ring in rings}
    compiled = trainer.engine.lower(state, xs[0], ys[0]).compile().as_text()
    copies = [line for line in compiled.splitlines() if " copy(" in line
              and any(f"[{shape}]" in line.split("copy(")[0] for shape in shapes)]
    assert rings and not copies, f"the compiled tick copies a stash ring: {copies[:2]}"


@pytest.mark.parametrize("stash", ["recompute", "selective"])
def test_a_small_vit_on_the_mesh_matches_the_emulator(stash):
    """Attention stages (dot_general, softmax, LayerNorm): FDBP K=4 on the mesh equals the emulator. SGD,
    not Adam: the attention key bias has a gradient of exactly zero in exact arithmetic (softmax ignores a
    constant per query), and Adam would turn its float noise, of either sign, into full-size steps."""
    from fdbp_jax.vit import cifar_vit

    (emulator, state, emulator_losses), (mesh, mesh_state, mesh_losses), initial, _ = mesh_and_emulator(
        4, 2, "sgd_momentum", 1.0, ticks=6, stash=stash, stages=cifar_vit(10, depth=2, width=16, heads=2)
    )
    assert toy.max_relative_error(emulator.stage_variables(state), initial) > 1e-3
    # leaf by leaf with an absolute floor: the key biases stay at float noise (~1e-10), where a relative
    # error means nothing
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 emulator.stage_variables(state), mesh.stage_variables(mesh_state))
    np.testing.assert_allclose(mesh_losses, emulator_losses, rtol=1e-5)
