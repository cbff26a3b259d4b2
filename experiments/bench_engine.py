"""Engine overhead, memory, traffic and the speed model, measured on the 8-device CPU mesh.

    python experiments/bench_engine.py [--steps 8] [--rounds 3] [--batch 128] [--microbatches 4,8,16]
        [--engines bp,fdbp,gpipe,1f1b] [--system-malloc] [--out runs/bench]

For ResNet-20 and an MLP: wall time per training example of one FDBP tick on a (2, 4) mesh (every
stash mode) and on a (4, 2) mesh (K=2: every stash mode, at half the per-device batch), of one GPipe
and one 1F1B step on the (2, 4) mesh (each --microbatches M), and of one
BP step on (8, 1) and on (2, 4), all in this process, timed in --rounds rounds of --steps steps each in
turn (so the machine's drift over minutes slows every configuration alike), the median of them; each
compiled step's per-device memory (`memory_analysis`), and its CPU time (user, kernel) and page
faults per step; BP on (8, 1) at FDBP's per-device batch (global 4x), and FDBP with one stage there
(data-parallel SGD through the FDBP engine: its own overhead); FDBP's stash growth with K; the bytes
sent between stages per tick; and the speed model's predicted vs measured tick (every stash, on each FDBP
mesh). Unless --system-malloc, it restarts itself with malloc on transparent huge pages kept in its
arenas and XLA:CPU scheduling for memory (`fdbp_jax.host_memory.mesh_environment`), as fdbp-train does on
a simulated mesh.
Writes <out>/bench.json.
The last line printed is the ResNet-20 ratio FDBP (fastest stash) / best BP on each FDBP mesh.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys

import jax

DEVICES = 8  # the simulated mesh: (8, 1), (2, 4) and (4, 2)
SHAPES = ((2, 4), (4, 2))  # FDBP's meshes (data, stage): K=4 and K=2 on the 8 devices
jax.config.update("jax_num_cpu_devices", DEVICES)

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import fdbp_jax as fj  # noqa: E402
from fdbp_jax import costs, host_memory, models, partition, perf  # noqa: E402
from fdbp_jax.engines import STASH_MODES  # noqa: E402
from fdbp_jax.losses import cross_entropy  # noqa: E402


class Dense(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(self.features)(x.reshape(x.shape[0], -1)))



class Classifier(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(x)


def model_blocks(name: str) -> list[nn.Module]:
    """An MLP (7 x Dense 1024) or one of the library's models, as a block sequence."""
    if name == "mlp":
        return [Dense(1024) for _ in range(7)] + [Classifier()]
    return models.model_blocks(name)


def cpu_per_step(trainer, state, x, y, steps: int = 3) -> tuple[dict, object]:
    """This process's CPU seconds (user, kernel), wall seconds and minor page faults per step over `steps`
    more steps, and the cores they kept busy (CPU / wall of the same steps): where the wall time goes on
    the shared cores. (Those per step, the state.)"""
    before, faults = os.times(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        state, _ = trainer.step(state, x, y)
        jax.block_until_ready(state)
    after = os.times()
    cpu, wall = (after.user - before.user) + (after.system - before.system), after.elapsed - before.elapsed
    return {"user_s": (after.user - before.user) / steps, "system_s": (after.system - before.system) / steps,
            "wall_s": wall / steps, "cores_busy": cpu / wall,
            "minor_faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps}, state


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of sharded arrays."""
    return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


def compiled_memory(trainer, state, x, y) -> dict:
    """Per-device bytes of the compiled step: its arguments (state and batch), outputs, XLA
    temporaries, and their sum less what outputs reuse of the arguments (donation): the peak."""
    analysis = trainer.compiled_step(state, x, y).memory_analysis()
    sizes = {name: int(getattr(analysis, f"{name}_size_in_bytes", 0)) for name in ("argument", "output", "temp", "alias")}
    return {**sizes, "peak": sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"]}


def engine_memory(trainer, state, compiled: dict) -> dict:
    """FDBP's state per device by part, with the temporaries of its compiled tick (`compiled_memory`)."""
    plan = trainer.engine.packed
    real = [int(np.prod(s.shape[1:])) for s in plan.in_shapes[1:-1]]
    local_batch = plan.in_shapes[0].shape[0]
    return {
        "params": per_device_bytes(state.params),
        "optimizer_state": per_device_bytes(state.opt_state),
        "model_state": per_device_bytes(state.model_state),
        "stash": per_device_bytes((state.stash, state.stash_params, state.stash_model_state)),
        "messages": per_device_bytes((state.messages, state.label_msg)),
        "temporaries": compiled["temp"],
        "bytes_sent_per_tick_per_device": (len(state.messages) * local_batch * plan.message_width
                                           * plan.message_dtype.itemsize),
        "message_padding_share": 1 - (sum(real) / len(real)) / plan.message_width if real else 0.0,
    }


def stage_costs(blocks, boundaries, local_batch: int, repeats: int = 5) -> dict[str, list[perf.StageCost]]:
    """Each stage's tick work measured on one device at `local_batch` (fdbp_jax.costs), per modeled stash."""
    split = costs.new_split(boundaries)
    costs.measure_split(split, blocks, len(boundaries) + 1, (32, 32, 3), local_batch, costs.default_optimizer(),
                        repeats)
    measured = {"splits": {str(len(boundaries) + 1): split}}
    return {stash: perf.stage_costs(measured, len(boundaries) + 1, stash=stash) for stash in perf.TICK_CURVES}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="timed steps of each configuration per round")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds in which every configuration runs --steps steps in turn (the median of all of them)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--models", default="mlp,resnet20")
    p.add_argument("--microbatches", default="4,8,16", help="GPipe / 1F1B micro-batches per global batch")
    p.add_argument("--engines", default="bp,fdbp,gpipe,1f1b", help="which engine families to time")
    p.add_argument("--system-malloc", action="store_true",
                   help="keep glibc malloc's and XLA:CPU's defaults (else the program restarts itself with "
                        "fdbp_jax.host_memory.mesh_environment: huge pages kept in malloc's arenas, XLA:CPU "
                        "scheduling for memory, as fdbp-train does on a simulated mesh)")
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args(argv)
    if argv is None and not args.system_malloc and host_memory.uses_mesh_environment_by_default(DEVICES):
        host_memory.restart_with_mesh_environment()
    families = args.engines.split(",")
    if "bp" not in families or "fdbp" not in families:
        p.error("--engines must include bp and fdbp: the ratios and the speed model compare them")
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, args.batch).astype(np.int32)
    results, ratio = {}, None
    for name in args.models.split(","):
        blocks = model_blocks(name)
        local = jax.ShapeDtypeStruct((args.batch // 2, 32, 32, 3), jnp.float32)
        flops, _ = partition.block_costs(blocks, local)
        cuts = {K: partition.linear_partition(flops, K) for _, K in SHAPES}
        cut, stages = cuts[4], partition.join_blocks(blocks, cuts[4])
        opt = optax.sgd(0.05, momentum=0.9)
        row = {"boundaries": cut, "balance": partition.balance(flops, cut),
               "boundaries (4,2)": cuts[2], "balance (4,2)": partition.balance(flops, cuts[2])}
        runs = {
            "bp (8,1)": fj.Trainer(stages, cross_entropy, opt, mesh=fj.make_mesh(8, 1), algorithm="bp"),
            "bp (2,4)": fj.Trainer(stages, cross_entropy, opt, mesh=fj.make_mesh(2, 4), algorithm="bp"),
            **{f"fdbp ({N},{K}) {mode}": fj.Trainer(partition.join_blocks(blocks, cuts[K]), cross_entropy, opt,
                                                    mesh=fj.make_mesh(N, K), stash=mode)
               for N, K in SHAPES for mode in STASH_MODES},
            **{f"{algorithm} (2,4) M={M}": fj.Trainer(stages, cross_entropy, opt, mesh=fj.make_mesh(2, 4),
                                                     algorithm=algorithm, microbatches=M)
               for M in map(int, args.microbatches.split(",")) for algorithm in ("gpipe", "1f1b")
               if algorithm in families},
        }
        timed = perf.time_interleaved({label: (trainer, trainer.init(jax.random.key(0), x))
                                       for label, trainer in runs.items()}, x, y, args.steps, args.rounds)
        for label, trainer in runs.items():
            compile_s, step_s, state = timed.pop(label)
            cpu, state = cpu_per_step(trainer, state, x, y)
            row[label] = {"compile_s": compile_s, "step_s": step_s, "us_per_example": 1e6 * step_s / args.batch,
                          "cpu_per_step": cpu,
                          "compiled_memory": compiled_memory(trainer, state, x, y),
                          "bubble": getattr(trainer.engine, "bubble_fraction", None)}
            if label.startswith("fdbp"):
                row[label]["memory"] = engine_memory(trainer, state, row[label]["compiled_memory"])
            peak = row[label]["compiled_memory"]["peak"] / 2**20
            print(f"{name:9s} {label:22s} compile {compile_s:6.1f} s  {1e6 * step_s / args.batch:8.1f} us/example  "
                  f"peak {peak:7.1f} MiB/device  CPU/step user {cpu['user_s'] * 1e3:5.0f} ms kernel "
                  f"{cpu['system_s'] * 1e3:4.0f} ms, {cpu['minor_faults']:7.0f} faults, {cpu['cores_busy']:.2f} cores busy",
                  flush=True)
        best_bp = min(row["bp (8,1)"]["step_s"], row["bp (2,4)"]["step_s"])
        for mode in STASH_MODES:
            row[f"ratio {mode}"] = row[f"fdbp (2,4) {mode}"]["step_s"] / best_bp
            row[f"ratio (4,2) {mode}"] = row[f"fdbp (4,2) {mode}"]["step_s"] / best_bp
        row["fastest stash"] = min(STASH_MODES, key=lambda mode: row[f"ratio {mode}"])
        row["fastest stash (4,2)"] = min(STASH_MODES, key=lambda mode: row[f"ratio (4,2) {mode}"])
        # BP on (8,1) at FDBP's per-device batch (global 4x): how much of the ratio is this machine's
        # per-example cost growing with the per-device batch, and how much is FDBP's own
        wide = np.concatenate([x] * 4), np.concatenate([y] * 4)
        whole = partition.join_blocks(blocks, [])  # FDBP with one stage: data-parallel SGD through the FDBP engine
        wide_runs = {"bp": fj.Trainer(stages, cross_entropy, opt, mesh=fj.make_mesh(8, 1), algorithm="bp"),
                     "fdbp K=1": fj.Trainer(whole, cross_entropy, opt, mesh=fj.make_mesh(8, 1))}
        wide_timed = perf.time_interleaved({label: (trainer, trainer.init(jax.random.key(0), wide[0]))
                                            for label, trainer in wide_runs.items()}, *wide, args.steps, args.rounds)
        step_s, k1_s = wide_timed["bp"][1], wide_timed["fdbp K=1"][1]
        row["bp (8,1) at FDBP's per-device batch"] = {"global_batch": 4 * args.batch, "us_per_example":
                                                      1e6 * step_s / (4 * args.batch)}
        row["ratio at the same per-device batch"] = {
            mode: row[f"fdbp (2,4) {mode}"]["step_s"] / args.batch / (step_s / (4 * args.batch)) for mode in STASH_MODES}
        print(f"{name:9s} bp (8,1) at global batch {4 * args.batch} ({args.batch // 2} per device): "
              f"{1e6 * step_s / (4 * args.batch):8.1f} us/example", flush=True)
        # FDBP with one stage is data-parallel SGD: its time against BP's is the engine's own overhead
        row["fdbp K=1 (8,1) at FDBP's per-device batch"] = {"us_per_example": 1e6 * k1_s / (4 * args.batch),
                                                             "ratio to bp": k1_s / step_s}
        print(f"{name:9s} fdbp K=1 (8,1) at the same batch: {1e6 * k1_s / (4 * args.batch):8.1f} us/example "
              f"({k1_s / step_s:.3f}x BP: the engine's overhead)", flush=True)
        stash_growth = {}
        for K in (2, 4, 8):
            if K > len(blocks):
                continue
            cut_k = partition.linear_partition(flops, K)
            trainer = fj.Trainer(partition.join_blocks(blocks, cut_k), cross_entropy, opt, mesh=fj.make_mesh(1, K),
                                 stash="recompute")
            state = trainer.init(jax.random.key(0), x)
            stash_growth[K] = per_device_bytes((state.stash, state.stash_params, state.stash_model_state))
        row["stash_bytes_per_device_by_K (N=1)"] = stash_growth
        row["model"] = {}
        for N, K in SHAPES:  # each stage's curves measured at its per-device batch on one device
            mesh_label, local_batch = f"({N},{K})", args.batch // N
            row["model"][mesh_label] = {}
            for stash, measured_stages in stage_costs(blocks, cuts[K], local_batch).items():
                predicted = perf.shared_cores_tick_time(measured_stages, args.batch, N, cores=os.cpu_count())
                measured = row[f"fdbp {mesh_label} {stash}"]["step_s"]
                row["model"][mesh_label][stash] = {
                    "predicted_tick_s": predicted, "measured_tick_s": measured,
                    "relative_error": (predicted - measured) / measured,
                    "stage_tick_s": [c.work(local_batch) for c in measured_stages]}
                print(f"{name:9s} speed model, {mesh_label} {stash} stash: predicted tick {predicted * 1e3:.1f} ms, "
                      f"measured {measured * 1e3:.1f} ms ({100 * (predicted - measured) / measured:+.0f}%)", flush=True)
        results[name] = row
        ratio = (row[f"ratio {row['fastest stash']}"], row[f"ratio (4,2) {row['fastest stash (4,2)']}"]) \
            if name == "resnet20" else ratio
    results["provenance"] = {**costs.provenance(), "steps": args.steps, "rounds": args.rounds, "batch": args.batch,
                             "malloc": {"GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""),
                                        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}}
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    for name, row in ((n, r) for n, r in results.items() if n != "provenance"):
        print(f"{name}: FDBP/BP time per example = " + ", ".join(f"{row[f'ratio {m}']:.3f} ({m})" for m in STASH_MODES)
              + "; at the same per-device batch " + ", ".join(
                  f"{row['ratio at the same per-device batch'][m]:.3f} ({m})" for m in STASH_MODES)
              + "; on (4,2) " + ", ".join(f"{row[f'ratio (4,2) {m}']:.3f} ({m})" for m in STASH_MODES))
    if ratio is not None:
        print(f"resnet20 FDBP, fastest stash, / best BP per-example time ratio: (4,2) {ratio[1]:.3f}; "
              f"(2,4) {ratio[0]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
