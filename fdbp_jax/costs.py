"""Measured costs of a model's work on the current device, at several per-device batches: each
stage's forward and its whole tick (forward of the new batch + delayed backward with its recomputed
forward + optax update, as one jitted call, as the FDBP tick runs it; and the same with each stash that
keeps residuals: "selective", whose forward saves its conv and matmul outputs and whose backward re-runs
the rest, and "residuals", which keeps all of the forward's VJP residuals), and the whole model's BP step.
The speed model (`fdbp_jax.perf`) reads these curves instead of assuming compute linear in the batch.

The result is plain JSON (`measure_model` returns it, `experiments/measure_costs.py` writes it):

    {"model": ..., "dtype": "float32", "image_shape": [32, 32, 3], "provenance": {...},
     "bp_step": [[batch, seconds], ...],                     # whole model: grads + update
     "splits": {"4": {"boundaries": [...], "stages": [       # one entry per stage k
         {"forward": [[batch, seconds], ...],                # training forward alone
          "tick": [[batch, seconds], ...],                   # the stage's whole tick work
          "tick_selective": [[batch, seconds], ...],         # the same with the "selective" stash
          "tick_residuals": [[batch, seconds], ...],         # and with the "residuals" stash
          "update_s": seconds,                               # the optax update alone
          "activation_elements": n,                          # per example, of the stage's output
          "param_count": n}, ...]}}}
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fdbp_jax import models, partition
from fdbp_jax.engines._cpu_convolutions import fast_convolutions
from fdbp_jax.perf import TICK_CURVES, median_seconds, random_inputs
from fdbp_jax.stages import Stage, apply_update, backprop_grads, delayed_grads, last_stage_grads, split_variables
from fdbp_jax.losses import cross_entropy

BATCHES = (8, 16, 32, 64, 128, 256)
RESIDUAL_STASHES = tuple(s for s in TICK_CURVES if s != "recompute")  # ticks that pull back stashed residuals


def source_commit() -> str | None:
    """The git commit of the fdbp_jax checkout that runs, with "+changes" where its tracked files differ
    from it; None where fdbp_jax is not in a git checkout (an installed wheel)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        git = lambda *args: subprocess.run(["git", "-C", here, *args], capture_output=True, text=True,
                                           timeout=30, check=True).stdout.strip()
        commit, changes = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+changes" if changes else "")


def cpu_model() -> str:
    """The host CPU's model name (Linux /proc/cpuinfo; else what `platform` knows): machines of one name
    can differ in their CPUs, and CPU timings are only comparable on the same one."""
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n", 1)[0]  # the first processor's fields
    except OSError:
        first = ""
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    return f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def provenance() -> dict:
    """Where a measurement ran: device, software versions, host and its CPU, date and the code's commit."""
    import flax

    device = jax.devices()[0]
    return {
        "platform": jax.default_backend(), "device_kind": device.device_kind, "device_count": jax.device_count(),
        "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
        "python": platform.python_version(), "host": platform.node(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": source_commit(),
    }


def default_optimizer() -> optax.GradientTransformation:
    """The CLI's update: SGD with momentum and coupled weight decay."""
    return optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))


def _is_shape(value) -> bool:
    return isinstance(value, tuple) and all(isinstance(n, int) for n in value)


def _random_batch(shapes, batch: int, seed: int = 0):
    """Random float32 inputs of `batch` examples: `shapes` is one per-example shape, or a pytree of them
    (a pytree stage boundary such as a half block's {"h", "skip"})."""
    return random_inputs(jax.tree.map(lambda shape: jax.ShapeDtypeStruct((batch, *shape), jnp.float32), shapes,
                                      is_leaf=_is_shape), seed)


def measure_stage(
    stage: Stage, k: int, num_stages: int, input_shape: tuple, batch: int, optimizer: optax.GradientTransformation,
    repeats: int, classes: int = 10,
) -> dict:
    """Seconds of stage k's training forward and of its whole tick work on `batch` examples, with the
    recompute stash ("tick") and each of RESIDUAL_STASHES ("tick_selective", "tick_residuals"; the last
    stage stashes nothing, so its ticks are one measurement)."""
    x = _random_batch(input_shape, batch)
    params, model_state = split_variables(stage.init(jax.random.key(0), x))
    opt_state = optimizer.init(params)
    out = jax.eval_shape(lambda p, h: stage.apply(p, model_state, h, train=True)[0], params, x)
    forward = jax.jit(lambda p, h: stage.apply(p, model_state, h, train=True)[0])
    if k == num_stages - 1:
        labels = jnp.asarray(np.arange(batch) % classes, jnp.int32)

        def tick(p, o, h):
            _, _, d_params, d_input = last_stage_grads(stage, cross_entropy, p, model_state, h, labels, k > 0)
            return d_input, *apply_update(optimizer, p, o, d_params)

        tick_args = (params, opt_state, x)
    else:
        output_grad = random_inputs(out, seed=1)

        def tick(p, o, h_new, h_old, g):
            y = stage.apply(p, model_state, h_new, train=True)[0]
            d_params, d_input, _ = delayed_grads(stage, p, model_state, h_old, g, k > 0)
            return y, d_input, *apply_update(optimizer, p, o, d_params)

        tick_args = (params, opt_state, x, _random_batch(input_shape, batch, seed=2), output_grad)
    timed = lambda fn, args: median_seconds(jax.jit(fast_convolutions(fn, jax.default_backend())), *args,
                                            repeats=repeats)
    ticks = {"tick": timed(tick, tick_args)}
    for stash in RESIDUAL_STASHES:
        ticks[TICK_CURVES[stash]] = ticks["tick"] if k == num_stages - 1 else timed(
            *stashing_tick(stage, k, stash, model_state, optimizer, tick_args))
    return {
        "forward": median_seconds(forward, params, x, repeats=repeats),
        **ticks,
        "output_shape": jax.tree.map(lambda o: tuple(o.shape[1:]), out),
        "params": params,
        "opt_state": opt_state,
    }


def stashing_tick(stage: Stage, k: int, stash: str, model_state, optimizer: optax.GradientTransformation,
                  tick_args: tuple) -> tuple[Callable, tuple]:
    """The tick of stage k < K-1 with a stash of RESIDUAL_STASHES, as the mesh engine runs it
    (`partition.stash_tick`: the new batch's forward keeping its residuals, and the pullback of the
    residuals a forward of the old batch stashed) with the update, and its arguments."""
    params, opt_state, h_new, h_old, output_grad = tick_args
    work, residuals = partition.stash_tick(stage, stash, stage.forward_key(0, 0), input_grad=k > 0)

    def tick(p, o, h, kept, g):
        y, kept_now, cotangents = work(p, model_state, h, kept, g)
        return y, kept_now, cotangents[1:], *apply_update(optimizer, p, o, cotangents[0])

    return tick, (params, opt_state, h_new, residuals(params, model_state, h_old), output_grad)


def measure_update(params, opt_state, optimizer: optax.GradientTransformation, repeats: int) -> float:
    grads = jax.tree.map(jnp.ones_like, params)
    return median_seconds(jax.jit(lambda p, o, g: apply_update(optimizer, p, o, g)), params, opt_state, grads,
                          repeats=repeats)


def measure_bp_step(
    blocks: Sequence, input_shape: tuple, batch: int, optimizer: optax.GradientTransformation, repeats: int,
    classes: int = 10,
) -> float:
    """Seconds of one synchronous BP step (gradients of the whole model + update) on `batch` examples."""
    stage = Stage(models.Blocks(tuple(blocks)))
    x = _random_batch(input_shape, batch)
    params, model_state = split_variables(stage.init(jax.random.key(0), x))
    opt_state = optimizer.init(params)
    labels = jnp.asarray(np.arange(batch) % classes, jnp.int32)

    def step(p, o, h):
        _, _, (d_params,) = backprop_grads([stage], cross_entropy, [p], [model_state], h, labels)
        return apply_update(optimizer, p, o, d_params)

    return median_seconds(jax.jit(fast_convolutions(step, jax.default_backend())), params, opt_state, x,
                          repeats=repeats)


def new_split(boundaries: Sequence[int]) -> dict:
    """An empty entry of "splits" for the stages that start at `boundaries`."""
    return {"boundaries": list(boundaries), "stages": [
        {"forward": [], **{curve: [] for curve in TICK_CURVES.values()}, "update_s": None,
         "activation_elements": None, "param_count": None}
        for _ in range(len(boundaries) + 1)]}


def measure_split(
    split: dict, blocks: Sequence, num_stages: int, input_shape: tuple, batch: int,
    optimizer: optax.GradientTransformation, repeats: int,
) -> None:
    """Add `batch`'s point to every stage's curves of one split (and its update time, once)."""
    shape = input_shape
    for k, module in enumerate(partition.join_blocks(blocks, split["boundaries"])):
        measured = measure_stage(Stage(module), k, num_stages, shape, batch, optimizer, repeats)
        entry = split["stages"][k]
        entry["forward"].append([batch, measured["forward"]])
        for curve in TICK_CURVES.values():
            entry[curve].append([batch, measured[curve]])
        if entry["update_s"] is None:
            entry["update_s"] = measure_update(measured["params"], measured["opt_state"], optimizer, repeats)
            entry["activation_elements"] = sum(int(np.prod(shape)) for shape in
                                               jax.tree.leaves(measured["output_shape"], is_leaf=_is_shape))
            entry["param_count"] = int(sum(leaf.size for leaf in jax.tree.leaves(measured["params"])))
        shape = measured["output_shape"]


def measure_model(
    model: str, num_stages: Sequence[int] = (4, 2), batches: Sequence[int] = BATCHES, repeats: int = 30,
    input_shape: tuple = (32, 32, 3), deadline: float | None = None, on_progress: Callable[[dict], None] | None = None,
) -> dict:
    """Measure `model` on the current device: the BP step and every stage of the cost-balanced
    split into each K of `num_stages`, in increasing batches (the BP step and the first K over all
    batches before the other Ks). Starts no new batch once `deadline` (time.time()) has passed;
    `on_progress` gets the result after each batch, so a caller can save partial curves."""
    blocks = models.model_blocks(model)
    optimizer = default_optimizer()
    flops, _ = partition.block_costs(blocks, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    result = {"model": model, "dtype": "float32", "image_shape": list(input_shape), "provenance": provenance(),
              "repeats": repeats, "bp_step": [], "splits": {}}
    for K in num_stages:
        result["splits"][str(K)] = new_split(partition.linear_partition(flops, K))
    # the BP step and the first K first, over all batches; then the other Ks (a deadline may cut them)
    for phase, ks in enumerate((list(num_stages[:1]), list(num_stages[1:]))):
        for batch in batches if ks else ():
            if deadline is not None and time.time() > deadline:
                break
            if phase == 0:
                result["bp_step"].append([batch, measure_bp_step(blocks, input_shape, batch, optimizer, repeats)])
            for K in ks:
                measure_split(result["splits"][str(K)], blocks, K, tuple(input_shape), batch, optimizer, repeats)
            print(f"measured batch {batch} (K={ks}) on {result['provenance']['device_kind']}", file=sys.stderr,
                  flush=True)
            if on_progress is not None:
                on_progress(result)
    return result
