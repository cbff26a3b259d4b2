"""Cut a block sequence (flax.linen or flax.nnx modules, each taking the previous one's output) into K
contiguous stages that minimise the largest stage cost (exact dynamic programme), with block costs
from XLA's cost analysis of forward + backward (or seconds measured), plus, in the stages before the
last, the extra work of keeping each forward for its delayed backward (the stash's): `split_blocks`, the
public entry, and its pieces."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from fdbp_jax.models import Blocks
from fdbp_jax.engines._cpu_convolutions import fast_convolutions
from fdbp_jax.engines.fdbp_mesh import STASH_MODES, forward_with_pullback
from fdbp_jax.perf import median_seconds, random_inputs
from fdbp_jax.stages import as_stage, trace_shapes


MEASURES = ("flops", "time")  # what a block's cost is: counted FLOPs, or measured seconds


@dataclasses.dataclass
class Split:
    """K stages cut from a block sequence, with what the cut was chosen from. ``str(split)`` is the
    split table: each stage's blocks, parameters and share of FLOPs, and the balance."""

    stages: list  # K modules, for `Trainer(stages=split.stages, ...)`
    boundaries: list[int]  # the block index where each of stages 1..K-1 starts
    blocks: tuple
    example: jax.ShapeDtypeStruct  # one replica's batch, the costs are counted on
    measure: str = "flops"  # what a block's cost is (`MEASURES`)
    stash: str | None = None  # how stages before the last keep each forward (`STASH_MODES`), whose work they pay

    @functools.cached_property
    def _costs(self) -> tuple[list[float], list[int], list[float] | None]:
        return measure_blocks(self.blocks, self.example, self.measure, self.stash)

    @property
    def costs(self) -> list[float]:
        """Each block's forward + backward cost on the example batch (`measure`; counted when first asked for)."""
        return self._costs[0]

    @property
    def stash_costs(self) -> list[float] | None:
        """Each block's extra cost in the stages before the last, for keeping its forward (`stash`; None without)."""
        return self._costs[2]

    @property
    def params(self) -> list[int]:
        """Each block's parameter count."""
        return self._costs[1]

    @property
    def balance(self) -> float:
        return balance(self.costs, self.boundaries, self.stash_costs)

    def __str__(self) -> str:
        return describe_split(self.blocks, self.boundaries, self.costs, self.params,
                              "FLOPs" if self.measure == "flops" else "time", self.stash_costs)


def split_blocks(blocks: Sequence[Any], num_stages: int, example_x: Any,
                 boundaries: Sequence[int] | None = None, measure: str = "flops", stash: str | None = None) -> Split:
    """Cut `blocks` into `num_stages` stages: at `boundaries` if given (then no cost is counted until
    the table is asked for), else where the largest stage's cost on `example_x` (one replica's batch:
    an array or ShapeDtypeStruct) is smallest: its FLOPs, or with ``measure="time"`` its seconds
    measured on this device (`block_costs`: what balances real workers). A stage's cost is its blocks'
    forward + backward, and in every stage but the last (which runs its forward and backward at once)
    the extra work of its `stash` (`STASH_MODES`; `fdbp_jax.engines.split_stash` names an algorithm's): the
    forward again ("recompute": FDBP's recompute stash, GPipe, 1F1B), or a forward that keeps residuals
    and a backward from them beyond a plain forward + backward ("selective", "residuals"). Linen blocks become one linen stage
    per run of blocks; NNX blocks an `nnx.Sequential` (sharing the blocks' variables, so the stage starts
    from the weights the blocks hold). Blocks that do not chain are a ValueError naming the block."""
    blocks = tuple(blocks)
    if not blocks:
        raise ValueError("split_blocks needs a non-empty sequence of blocks")
    linen = [isinstance(b, nn.Module) for b in blocks]
    if not all(linen) and not all(isinstance(b, nnx.Module) for b in blocks):
        odd = next(i for i, b in enumerate(blocks) if not isinstance(b, nn.Module if linen[0] else nnx.Module))
        raise ValueError(
            f"block {odd} ({type(blocks[odd]).__name__}) is not a {'flax.linen' if linen[0] else 'flax.nnx'} Module "
            f"like block 0: a split takes blocks of one kind (all linen or all nnx)"
        )
    example = jax.ShapeDtypeStruct(np.shape(example_x), getattr(example_x, "dtype", np.float32))
    split = Split([], [], blocks, example, measure, stash)
    if boundaries is None:  # counting the costs checks the chain too
        boundaries = linear_partition(split.costs, num_stages, split.stash_costs)
    else:
        check_chain(blocks, example)
    check_boundaries(boundaries, len(blocks), num_stages)
    split.stages, split.boundaries = join_blocks(blocks, boundaries), list(boundaries)
    return split


def check_chain(blocks: Sequence[Any], example: jax.ShapeDtypeStruct) -> None:
    """A ValueError naming the first block that cannot take the previous one's output (shapes only)."""
    h = example
    for i, block in enumerate(blocks):
        stage = as_stage(block)
        variables = jax.eval_shape(stage.init, jax.random.key(0), h)
        h = trace_shapes([stage], [variables], h, what="block", first=i)[-1]


def join_blocks(blocks: Sequence[Any], boundaries: Sequence[int]) -> list:
    """Blocks cut at `boundaries` (indices where stages 1..K-1 start), each run of blocks one module."""
    edges = [0, *boundaries, len(blocks)]
    runs = [tuple(blocks[a:b]) for a, b in zip(edges[:-1], edges[1:])]
    return [Blocks(run) if isinstance(run[0], nn.Module) else nnx.Sequential(*run) for run in runs]


def block_costs(blocks: Sequence[Any], example: jax.ShapeDtypeStruct,
                measure: str = "flops") -> tuple[list[float], list[int]]:
    """Each block's cost on `example`'s batch and its parameter count; a ValueError naming the block and
    the shapes where a block cannot take the previous one's output. The cost (`measure`) is "flops" of
    forward + backward (counted, the same on every machine), or "time": seconds of forward + backward
    measured on the default device; FLOPs cost unevenly on a CPU (ResNet-20's 16-channel 32x32
    convolutions take ~2x the time per FLOP of its 64-channel ones)."""
    return measure_blocks(blocks, example, measure)[:2]


def measure_blocks(blocks: Sequence[Any], example: jax.ShapeDtypeStruct, measure: str = "flops",
                   stash: str | None = None) -> tuple[list[float], list[int], list[float] | None]:
    """`block_costs`, and with a `stash` (`STASH_MODES`) each block's extra cost when a stage before the last
    keeps its forward that way (else None), in one walk: its forward again ("recompute"), or the
    stashing tick (`stash_tick`) less a plain forward + backward, at least 0."""
    if measure not in MEASURES:
        raise ValueError(f"measure={measure!r} is not known: use one of {MEASURES}")
    if stash is not None and stash not in STASH_MODES:
        raise ValueError(f"stash={stash!r} is not known: use one of {STASH_MODES}, or None")
    works = ("forward_backward",) if stash is None else ("forward_backward", "forward" if stash == "recompute" else "stash")
    costs, params, h = {work: [] for work in works}, [], example
    for i, block in enumerate(blocks):
        stage = as_stage(block)
        variables = jax.eval_shape(stage.init, jax.random.key(0), h)
        state = {name: value for name, value in variables.items() if name != "params"}
        output = trace_shapes([stage], [variables], h, what="block", first=i)[-1]
        key = stage.forward_key(0, 0)
        forward = lambda p, s, x: stage.apply(p, s, x, train=True, key=key)[0]

        def forward_backward(p, s, x):
            out, vjp = jax.vjp(lambda p_, x_: forward(p_, s, x_), p, x)
            return vjp(jax.tree.map(jnp.ones_like, out))

        functions = {"forward_backward": forward_backward, "forward": forward}
        if "stash" in works:
            functions["stash"], residuals = stash_tick(stage, stash, key, input_grad=True)
        if measure == "time":
            concrete = stage.init(jax.random.key(0), jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), h))
            inputs = random_inputs(h, seed=i)
            concrete_state = {name: value for name, value in concrete.items() if name != "params"}
            for work in works:
                run = jax.jit(fast_convolutions(functions[work], jax.default_backend()))
                extra = (residuals(concrete["params"], concrete_state, random_inputs(h, seed=i + 1)),
                         random_inputs(output, seed=i + 2)) if work == "stash" else ()
                costs[work].append(median_seconds(run, concrete["params"], concrete_state, inputs, *extra, repeats=5))
        else:
            # counted by XLA:CPU on the lowered HLO, whatever the default backend: compiled GPU code hides
            # convolutions in library calls that report no FLOPs (an H100 cut ResNet-20 into [2, 3, 5]),
            # and the GPU client gives no analysis of lowered HLO
            for work in works:
                extra = (jax.eval_shape(residuals, variables["params"], state, h), output) if work == "stash" else ()
                with jax.default_device(jax.devices("cpu")[0]):
                    analysis = jax.jit(functions[work]).lower(variables["params"], state, h, *extra).cost_analysis()
                analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
                costs[work].append(float(analysis.get("flops", 0.0)))
        params.append(sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"])))
        h = output
    measured = np.asarray([costs[work] for work in works], np.float64)
    if measure == "time" and jax.process_count() > 1:  # every process cuts where process 0 measured
        measured = np.asarray(multihost_utils.broadcast_one_to_all(measured))
    rows = [[float(c) for c in row] for row in measured]
    if stash in ("selective", "residuals"):  # what the stashing tick costs beyond a plain forward + backward
        rows[1] = [max(0.0, tick - plain) for tick, plain in zip(rows[1], rows[0])]
    return rows[0], params, rows[1] if stash is not None else None


def stash_tick(stage: Any, stash: str, key: jax.Array, input_grad: bool) -> tuple[Callable, Callable]:
    """The work of a stage before the last that keeps residuals (`stash` "selective" or "residuals"),
    as the mesh engine runs it (`fdbp_mesh.forward_with_pullback`): a forward keeping the residuals,
    and the backward of an older forward from the residuals it kept (w.r.t. params, and the input if
    `input_grad`). (That tick, a function of params, model state, input, residuals and output gradient
    giving the output, the new residuals and the cotangents; and the forward's residuals, of the first
    three, jitted as the tick is traced.)"""
    run = lambda p, s, h: forward_with_pullback(stage, stash, p, s, h, key, input_grad=input_grad)
    # traced like the tick's own forward (jit): the residuals an eager forward keeps can differ in structure
    residuals = jax.jit(lambda p, s, h: jax.tree.leaves(run(p, s, h)[1]))

    def tick(p, s, h, kept, output_grad):
        y, pullback, _ = run(p, s, h)  # the older forward's pullback has the same structure
        return y, jax.tree.leaves(pullback), jax.tree.unflatten(jax.tree.structure(pullback), kept)(output_grad)

    return tick, residuals


def linear_partition(costs: Sequence[float], num_stages: int, extra: Sequence[float] | None = None) -> list[int]:
    """Boundaries (start index of stages 1..K-1) minimising the maximum stage cost, `stage_costs`; exact,
    O(K n^2). `extra`: each block's extra cost in the stages before the last (its stash's work)."""
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise ValueError(f"cannot cut {n} blocks into {num_stages} non-empty stages: use 1 <= K <= {n}")
    prefix = np.concatenate([[0.0], np.cumsum(costs)])
    extra_prefix = np.concatenate([[0.0], np.cumsum(extra if extra is not None else np.zeros(n))])
    # cost of blocks a..b-1 as stage j of K (1-based): the last stage pays no extra
    span = lambda a, b, j: prefix[b] - prefix[a] + (extra_prefix[b] - extra_prefix[a]) * (j < num_stages)
    # best[j][i]: smallest max-stage cost of the first i blocks in j stages; cut[j][i]: where the last starts
    best = np.full((num_stages + 1, n + 1), np.inf)
    cut = np.zeros((num_stages + 1, n + 1), dtype=int)
    best[0][0] = 0.0
    for j in range(1, num_stages + 1):
        for i in range(j, n + 1):
            for start in range(j - 1, i):
                candidate = max(best[j - 1][start], span(start, i, j))
                if candidate < best[j][i]:
                    best[j][i], cut[j][i] = candidate, start
    boundaries, i = [], n
    for j in range(num_stages, 0, -1):
        i = cut[j][i]
        boundaries.append(i)
    return sorted(int(b) for b in boundaries)[1:]


def stage_costs(costs: Sequence[float], boundaries: Sequence[int], extra: Sequence[float] | None = None) -> list[float]:
    """Each stage's cost: its blocks' `costs`, and in every stage but the last their `extra` too."""
    edges = [0, *boundaries, len(costs)]
    last = len(edges) - 2
    return [float(sum(costs[a:b]) + (sum(extra[a:b]) if extra is not None and k < last else 0.0))
            for k, (a, b) in enumerate(zip(edges[:-1], edges[1:]))]


def balance(costs: Sequence[float], boundaries: Sequence[int], extra: Sequence[float] | None = None) -> float:
    """Mean stage cost / max stage cost (`stage_costs`): 1.0 is a perfect split."""
    per_stage = stage_costs(costs, boundaries, extra)
    return float(np.mean(per_stage) / max(per_stage))


def check_boundaries(boundaries: Sequence[int], num_blocks: int, num_stages: int) -> None:
    """ValueError unless `boundaries` are K-1 strictly increasing indices inside (0, num_blocks)."""
    b = list(boundaries)
    if len(b) != num_stages - 1:
        raise ValueError(f"--boundaries needs K-1 = {num_stages - 1} values for K={num_stages}, got {len(b)}: {b}")
    if any(x >= y for x, y in zip([0, *b], [*b, num_blocks])):
        raise ValueError(
            f"--boundaries {','.join(map(str, b))} must be strictly increasing block indices between 1 and "
            f"{num_blocks - 1} (the model has {num_blocks} blocks)"
        )


def describe_split(
    blocks: Sequence[Any], boundaries: Sequence[int], costs: Sequence[float], params: Sequence[int],
    unit: str = "FLOPs", extra: Sequence[float] | None = None,
) -> str:
    """A table: each stage's blocks, parameter count and share of the cost (`unit`; `stage_costs`, with
    the `extra` work of the stages before the last), and the balance."""
    edges = [0, *boundaries, len(blocks)]
    per_stage = stage_costs(costs, boundaries, extra)
    total = sum(per_stage)
    lines = [f"{'stage':>5}  {'blocks':<10} {'params':>10} {unit + ' %':>8}  first .. last block"]
    for k, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        names = f"{type(blocks[a]).__name__} .. {type(blocks[b - 1]).__name__}"
        lines.append(
            f"{k:>5}  {f'{a}-{b - 1}':<10} {sum(params[a:b]):>10,} {100 * per_stage[k] / total:>7.1f}%  {names}"
        )
    lines.append(f"balance (mean/max stage {unit}{', with the stash work' if extra is not None else ''}): "
                 f"{balance(costs, boundaries, extra):.3f}")
    return "\n".join(lines)
