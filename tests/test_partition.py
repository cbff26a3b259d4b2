"""The stage partitioner is optimal (against brute force) and the models split as documented."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import toy
from flax import nnx

import fdbp_jax as fj
from fdbp_jax import models, partition


def brute_force(costs, k, rerun=None):
    best = None
    for cut in itertools.combinations(range(1, len(costs)), k - 1):
        worst = max(partition.stage_costs(costs, cut, rerun))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("seed", range(30))
def test_linear_partition_is_optimal(seed):
    """Against every cut, with and (odd seeds) without forwards re-run in the stages before the last."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 10))
    k = int(rng.integers(1, n + 1))
    costs = list(rng.exponential(size=n))
    rerun = list(rng.uniform(0.2, 0.5) * np.asarray(costs)) if seed % 2 == 0 else None
    cut = partition.linear_partition(costs, k, rerun)
    assert len(cut) == k - 1 and cut == sorted(cut) and all(0 < c < n for c in cut)
    assert max(partition.stage_costs(costs, cut, rerun)) == pytest.approx(brute_force(costs, k, rerun))


def test_partition_rejects_impossible_requests():
    with pytest.raises(ValueError, match="cannot cut 3 blocks into 4 non-empty stages"):
        partition.linear_partition([1, 2, 3], 4)
    with pytest.raises(ValueError, match="must be strictly increasing"):
        partition.check_boundaries([5, 3, 8], 11, 4)
    with pytest.raises(ValueError, match="needs K-1 = 3 values for K=4, got 2"):
        partition.check_boundaries([3, 5], 11, 4)


def test_balance():
    assert partition.balance([1, 1, 1, 1], [1, 2, 3]) == 1.0
    assert partition.balance([3, 1], [1]) == pytest.approx(2 / 3)
    # the last stage runs its forward once: stages cost [1 + 0.5, 1], [2 + 1, 1]
    assert partition.stage_costs([1, 1], [1], [0.5, 0.5]) == [1.5, 1.0]
    assert partition.stage_costs([2, 1, 1], [1, 2], [1, 0.5, 0.5]) == [3.0, 1.5, 1.0]
    # equal blocks: re-run forwards move the cut towards the last stage's side
    assert partition.linear_partition([1] * 10, 2) == [5] and partition.linear_partition([1] * 10, 2, [0.5] * 10) == [4]


@pytest.mark.parametrize("name,blocks,params", [("resnet20", 11, 269_722), ("resnet56", 29, 853_018), ("cnn", 6, 70_618)])
def test_model_blocks_and_parameter_counts(name, blocks, params):
    sequence = models.model_blocks(name)
    assert len(sequence) == blocks
    stages = partition.join_blocks(sequence, [1, blocks - 1])
    x = jnp.zeros((2, 32, 32, 3))
    total, h = 0, x
    for stage in stages:
        variables = stage.init(jax.random.key(0), h)
        total += sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
        h = stage.apply(variables, h)
    assert total == params and h.shape == (2, 10)


def test_cost_balanced_split_of_resnet20():
    blocks = models.model_blocks("resnet20")
    costs, params = partition.block_costs(blocks, jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32))
    assert all(c > 0 for c in costs) and params[-1] == 64 * 10 + 10
    cut = partition.linear_partition(costs, 4)
    # FLOPs counted on the lowered HLO by XLA:CPU (0.848 balance; the compiled count gave 0.853, same cut)
    assert cut == [3, 5, 7] and partition.balance(costs, cut) >= 0.84
    assert "balance (mean/max stage FLOPs)" in partition.describe_split(blocks, cut, costs, params)


def test_block_costs_are_counted_on_the_cpu_whatever_the_default_device():
    # a GPU's compiled code reports no FLOPs for its convolutions: the count must not come from it
    blocks = models.model_blocks("cnn")[:2]
    example = jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32)
    with jax.default_device(jax.devices()[-1]):
        moved, _ = partition.block_costs(blocks, example)
    assert moved == partition.block_costs(blocks, example)[0] and all(c > 1e6 for c in moved)


def test_the_stash_work_a_split_counts_for_each_algorithm():
    from fdbp_jax.engines import split_stash

    assert [split_stash("fdbp", s) for s in ("recompute", "selective", "residuals", "auto")] == [
        "recompute", "selective", "residuals", "selective"]
    assert split_stash("gpipe", "auto") == split_stash("1f1b", "selective") == "recompute"
    assert split_stash("bp", "recompute") is None
    with pytest.raises(ValueError, match="algorithm 'pipedream' is not known"):
        split_stash("pipedream", "auto")


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        models.model_blocks("vgg")


def nnx_blocks(width: int = 8) -> list:
    """Six NNX blocks on 8x8x3 inputs: a stem, four residual-free conv blocks, a head."""
    rngs = nnx.Rngs(0)
    convs = [nnx.Conv(3 if i == 0 else width, width, (3, 3), rngs=rngs) for i in range(5)]
    return [*convs, nnx.Sequential(lambda h: h.mean(axis=(1, 2)), nnx.Linear(width, 10, rngs=rngs))]


def test_split_blocks_cuts_nnx_and_linen_blocks_by_cost():
    example = jax.ShapeDtypeStruct((4, 8, 8, 3), jnp.float32)
    split = fj.split_blocks(nnx_blocks(), 3, example)
    assert len(split.stages) == 3 and all(isinstance(s, nnx.Module) for s in split.stages)
    assert split.boundaries == partition.linear_partition(split.costs, 3) and len(split.costs) == 6
    rerun = fj.split_blocks(nnx_blocks(), 3, example, stash="recompute")  # each block's forward FLOPs
    assert all(0 < f < c for f, c in zip(rerun.stash_costs, rerun.costs))
    assert rerun.boundaries == partition.linear_partition(rerun.costs, 3, rerun.stash_costs)
    assert "balance (mean/max stage FLOPs)" in str(split) and 0 < split.balance <= 1
    trainer = fj.Trainer(split.stages, toy.cross_entropy, optax.sgd(0.1))
    x, y = toy.batches(1, batch=4)
    trainer.init(jax.random.key(0), x[0])  # the stages chain
    linen = fj.split_blocks(models.model_blocks("cnn"), 2, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32),
                            boundaries=[2])
    assert linen.boundaries == [2] and [len(s.blocks) for s in linen.stages] == [2, 4]


def test_split_blocks_counts_each_stash_work_in_the_stages_before_the_last():
    """A stage before the last pays its stash: the whole forward again (recompute), the elementwise ops
    recomputed from the saved matmul/conv outputs (selective), or little beyond forward + backward
    (residuals); counted per block in FLOPs, and the cut minimises the largest stage with them."""
    example = jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32)
    splits = {stash: fj.split_blocks(models.model_blocks("cnn"), 2, example, stash=stash)
              for stash in ("recompute", "selective", "residuals")}
    for recompute, selective, residuals in zip(*(s.stash_costs for s in splits.values())):
        assert recompute >= selective > residuals >= 0
    for split in splits.values():
        assert split.boundaries == partition.linear_partition(split.costs, 2, split.stash_costs)
    with pytest.raises(ValueError, match=r"stash='everything' is not known: use one of \('recompute'"):
        fj.split_blocks(models.model_blocks("cnn"), 2, example, stash="everything")


def test_split_blocks_names_the_block_that_does_not_chain():
    rngs = nnx.Rngs(0)
    blocks = [nnx.Conv(3, 8, (3, 3), rngs=rngs), nnx.Conv(4, 8, (3, 3), rngs=rngs)]
    with pytest.raises(ValueError, match=r"block 1 \(Conv\) cannot take the output of block 0: got shape \(4, 8, 8, 8\)"):
        fj.split_blocks(blocks, 2, np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"block 1 \(Dense\) is not a flax.nnx Module like block 0"):
        fj.split_blocks([blocks[0], nn.Dense(3)], 2, np.zeros((4, 8, 8, 3), np.float32))


def test_split_blocks_can_balance_measured_time():
    """measure="time": each block's forward + backward in seconds on this device; with stash="recompute"
    its forward again in the stages before the last (FDBP recomputing, GPipe, 1F1B)."""
    example = jax.ShapeDtypeStruct((4, 8, 8, 3), jnp.float32)
    split = fj.split_blocks(nnx_blocks(), 2, example, measure="time")
    assert split.measure == "time" and all(0 < c < 10 for c in split.costs) and split.stash_costs is None
    assert split.boundaries == partition.linear_partition(split.costs, 2)
    assert "balance (mean/max stage time)" in str(split)
    rerun = fj.split_blocks(nnx_blocks(), 2, example, measure="time", stash="recompute")
    assert len(rerun.stash_costs) == 6 and all(0 < c < 10 for c in rerun.stash_costs)
    assert rerun.boundaries == partition.linear_partition(rerun.costs, 2, rerun.stash_costs)
    assert "balance (mean/max stage time, with the stash work)" in str(rerun)
    with pytest.raises(ValueError, match="measure='watts' is not known"):
        fj.split_blocks(nnx_blocks(), 2, example, measure="watts")


def whole_variables_to_halves(whole: dict, blocks: list) -> dict:
    """The variables of `models.Blocks(blocks)` for the same network in half blocks: a basic block's
    conv-BN-ReLU goes to its first half, its second conv and BN to its second half."""
    halves, out = {name: {} for name in whole}, 0
    for i, block in enumerate(blocks):
        for name, tree in whole.items():
            if f"blocks_{i}" not in tree:  # the head has no batch_stats
                continue
            block_vars = tree[f"blocks_{i}"]
            if isinstance(block, models.BasicBlock):
                halves[name][f"blocks_{out}"] = {"ConvBN_0": block_vars["ConvBN_0"]}
                halves[name][f"blocks_{out + 1}"] = {k: v for k, v in block_vars.items() if k != "ConvBN_0"}
            else:
                halves[name][f"blocks_{out}"] = block_vars
        out += 2 if isinstance(block, models.BasicBlock) else 1
    return halves


def test_half_blocks_compute_what_the_whole_blocks_compute():
    whole_blocks = models.model_blocks("resnet20")
    halved = models.model_blocks("resnet20", split_unit="half-block")
    assert len(halved) == 2 * len(whole_blocks) - 2  # the stem and the head stay whole
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 3)), jnp.float32)
    whole = models.Blocks(tuple(whole_blocks)).init(jax.random.key(0), x)
    leaves, treedef = jax.tree.flatten(whole)  # random weights: the zero-initialised BN scales would hide a bug
    keys = jax.random.split(jax.random.key(1), len(leaves))
    whole = jax.tree.unflatten(treedef, [leaf + 0.1 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)])
    halves = whole_variables_to_halves(whole, whole_blocks)
    expected, expected_state = models.Blocks(tuple(whole_blocks)).apply(whole, x, True, mutable=["batch_stats"])
    got, got_state = models.Blocks(tuple(halved)).apply(halves, x, True, mutable=["batch_stats"])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    expected_state = whole_variables_to_halves(expected_state, whole_blocks)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got_state, expected_state)
    with pytest.raises(ValueError, match="no residual block to cut in half"):
        models.model_blocks("cnn", split_unit="half-block")


def test_a_cut_inside_a_residual_block_trains_on_the_mesh_as_in_the_emulator():
    """K=2 cut between a basic block's convs: the boundary {h, skip} travels packed, and the mesh
    equals the emulator."""
    from test_engine import mesh_and_emulator

    blocks = models.half_blocks([models.ConvBN(4), models.BasicBlock(8, 2), models.Head(10)])
    split = fj.split_blocks(blocks, 2, jax.ShapeDtypeStruct((8, 8, 8, 3), jnp.float32), boundaries=[2])
    assert [type(b).__name__ for b in split.stages[1].blocks] == ["BasicBlockOut", "Head"]
    (emulator, state, emu_losses), (engine, mesh_state, mesh_losses), _, _ = mesh_and_emulator(
        2, 1, "sgd_momentum", 1.0, ticks=5, stages=split.stages)
    np.testing.assert_allclose(mesh_losses, emu_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 engine.stage_variables(mesh_state), emulator.stage_variables(state))
