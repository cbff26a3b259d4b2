"""Time to accuracy on real parallel workers: `fdbp-train` runs, each of P pinned processes (one CPU
core and one device each, or one GPU each) joined by jax.distributed, against BP on one worker.

    TFDS_DATA_DIR=../shared/tfds python experiments/workers_to_accuracy.py --preset quick --target 0.45 \
        [--configs bp1,bp,fdbp,1f1b] [--microbatches 4] [--split-by time] [--out runs/to-accuracy]

Runs, one after another: "bp1", BP on one worker (beside an identical twin run on the other core, so it
sees the machine the pairs see; both are reported), "bp", data-parallel BP on P workers, "fdbp", FDBP with
K = P stages, and "1f1b", 1F1B with K = P and --microbatches (both cut by --split-by). Each is a real
training run; from its metrics.jsonl: wall-clock seconds (compile and evaluation included) to the first
evaluation at or above --target test accuracy, the final accuracy and the training images/s (all epochs,
and the median of the epochs after the first, which compiles). Writes <out>/to_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_workers import free_port, on_gpu, worker_process  # noqa: E402

CONFIGS = ("bp1", "bp", "fdbp", "1f1b")


def config_flags(name: str, processes: int, microbatches: int, split_by: str) -> tuple[list[str], bool]:
    """`fdbp-train` flags of a configuration, and whether its processes are joined (else independent twins)."""
    pipelined = ["--stages", str(processes), "--data-parallel", "1", "--split-by", split_by]
    return {
        "bp1": (["--algorithm", "bp", "--stages", "1", "--data-parallel", "1"], False),
        "bp": (["--algorithm", "bp", "--stages", "1", "--data-parallel", str(processes)], True),
        "fdbp": (["--algorithm", "fdbp", *pipelined], True),
        "1f1b": (["--algorithm", "1f1b", *pipelined, "--microbatches", str(microbatches)], True),
    }[name]


def run(name: str, flags: list[str], joined: bool, workdirs: list[str]) -> None:
    """One configuration on len(workdirs) processes: joined by jax.distributed (all share workdirs[0]'s
    run), or independent runs, one per workdir."""
    port, procs = free_port(), []
    for i, workdir in enumerate(workdirs):
        join = ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(len(workdirs)),
                "--process-id", str(i)] if joined else []
        command, env = worker_process([sys.executable, "-m", "fdbp_jax.cli", *flags, "--workdir", workdir, *join], i)
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for proc in procs:
        out, _ = proc.communicate(timeout=7200)
        if proc.returncode != 0:
            raise RuntimeError(f"{name}: fdbp-train exited with {proc.returncode}: {out[-3000:]}")


def summarise(workdir: str, target: float) -> dict:
    """From one run's metrics.jsonl and summary.json: time to --target, final accuracy, images/s."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        evals = [e for e in map(json.loads, f) if e.get("event") == "eval"]
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    reached = next((e for e in evals if e["test_accuracy"] >= target), None)
    return {"seconds_to_target": reached["wall_time_s"] if reached else None,
            "epoch_at_target": reached["epoch"] if reached else None,
            "final_test_accuracy": evals[-1]["test_accuracy"], "wall_time_s": summary["wall_time_s"],
            "images_per_s": summary["images_per_s"],
            # epochs after the first (which compiles): what the benchmark's steady state compares with
            "steady_images_per_s": statistics.median(e["images_per_s"] for e in evals[1:]) if len(evals) > 1 else None,
            "accuracy_by_epoch": [(e["epoch"], e["wall_time_s"], e["test_accuracy"]) for e in evals]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="quick")
    p.add_argument("--target", type=float, required=True, help="test accuracy to time, e.g. 0.45")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-by", default="time", choices=("time", "flops"), help="how FDBP and 1F1B cut the model")
    p.add_argument("--extra", default="", help="more fdbp-train flags for every run, e.g. '--epochs 3'")
    p.add_argument("--out", default="runs/to-accuracy")
    args = p.parse_args(argv)
    names = args.configs.split(",")
    if unknown := [n for n in names if n not in CONFIGS]:
        p.error(f"--configs {','.join(unknown)}: not known; use some of {', '.join(CONFIGS)}")
    if os.path.exists(args.out) and os.listdir(args.out):
        p.error(f"--out {args.out} already holds files: give an empty or new folder (nothing is overwritten)")
    os.makedirs(args.out, exist_ok=True)
    P, rows = args.processes, []
    for name in names:
        flags, joined = config_flags(name, P, args.microbatches, args.split_by)
        flags = ["--preset", args.preset, "--seed", str(args.seed), *flags, *args.extra.split()]
        workdirs = [os.path.join(args.out, name)] * P if joined else [os.path.join(args.out, f"{name}-{i}") for i in range(P)]
        run(name, flags, joined, workdirs)
        runs = [summarise(w, args.target) for w in sorted(set(workdirs))]
        rows.append({"name": name, "flags": flags, "processes": P if joined else 1, "runs": runs})
        for r in runs:
            print(f"{name:<6} to {args.target:.2f}: {r['seconds_to_target']} s (epoch {r['epoch_at_target']}), "
                  f"final {r['final_test_accuracy']:.4f}, {r['images_per_s']:.0f} images/s", flush=True)
    from fdbp_jax import costs

    result = {"provenance": {**costs.provenance(), "processes": P, "preset": args.preset, "seed": args.seed,
                             "target": args.target, "extra": args.extra, "split_by": args.split_by, "pinned": not on_gpu(),
                             "data": os.environ.get("TFDS_DATA_DIR", "tfds default")},
              "rows": rows}
    with open(os.path.join(args.out, "to_accuracy.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
