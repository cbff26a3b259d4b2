"""FDBP vs BP on the same data, seeds and epoch budget, over a grid of K, N and beta.

    python experiments/compare.py --preset quick --seeds 0,1,2 --stages 2,4 --data-parallel 2

Writes <out>/results.json and <out>/accuracy.png (test accuracy vs epoch and vs wall time, train
loss vs epoch) and prints a table. BP runs with the same N replicas (one stage), so each replica
sees the same per-replica batch (and BatchNorm statistics) as an FDBP replica.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from fdbp_jax.config import PRESETS, Config
from fdbp_jax.runner import run_grid, script_exit

ints = lambda s: [int(v) for v in s.split(",") if v]
floats = lambda s: [float(v) for v in s.split(",") if v]


def grid(args) -> list[Config]:
    base = Config(**PRESETS[args.preset])
    overrides = {k: v for k, v in (("epochs", args.epochs), ("train_examples", args.train_examples),
                                    ("eval_examples", args.eval_examples), ("lr", args.lr),
                                    ("warmup_epochs", args.warmup_epochs),
                                    ("staleness_power", args.staleness_power)) if v is not None}
    base = dataclasses.replace(base, **overrides)
    runs = []
    for seed in args.seeds:
        for n in args.data_parallel:
            runs.append(dataclasses.replace(base, algorithm="bp", stages=1, data_parallel=n, seed=seed))
            for k in args.stages:
                for beta in args.shrink:
                    runs.append(dataclasses.replace(base, algorithm="fdbp", stages=k, data_parallel=n, shrink=beta, seed=seed))
    return runs


def label(c: Config) -> str:
    return "BP" if c.algorithm == "bp" else f"FDBP K={c.stages} beta={c.shrink:g} p={c.staleness_power:g}"


def table(results: list[dict]) -> str:
    import numpy as np

    groups: dict[tuple, list[dict]] = {}
    for r in results:
        c = r["config"]
        key = (c["algorithm"], c["stages"], c["data_parallel"], c["shrink"], c["staleness_power"])
        groups.setdefault(key, []).append(r)
    bp = {key[2]: np.mean([r["test_accuracy"] for r in rs]) for key, rs in groups.items() if key[0] == "bp"}
    lines = [f"{'method':<28} {'N':>2} {'seeds':>5} {'test acc %':>14} {'best %':>7} {'train loss':>10} "
             f"{'img/s':>7} {'vs BP':>7}"]
    for (alg, k, n, beta, power), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "bp", kv[0][1], kv[0][3])):
        acc = np.array([r["test_accuracy"] for r in rs]) * 100
        name = "BP" if alg == "bp" else f"FDBP K={k} beta={beta:g} p={power:g}"
        gap = acc.mean() - bp[n] * 100 if n in bp else float("nan")
        lines.append(
            f"{name:<28} {n:>2} {len(rs):>5} {acc.mean():>7.2f} ± {acc.std():>4.2f} "
            f"{np.mean([r['best_test_accuracy'] for r in rs]) * 100:>7.2f} "
            f"{np.mean([r['final_train_loss'] for r in rs]):>10.3f} {np.mean([r['images_per_s'] for r in rs]):>7.0f} "
            f"{gap:>+7.2f}"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for r in results:
        h = r["history"]
        name = label(Config.from_json(r["config"])) + f" s{r['config']['seed']}"
        epochs = [e["epoch"] for e in h]
        axes[0].plot(epochs, [100 * e["test_accuracy"] for e in h], label=name)
        axes[1].plot([e["wall_time_s"] for e in h], [100 * e["test_accuracy"] for e in h], label=name)
        axes[2].plot(epochs, [e["train_loss"] for e in h], label=name)
    for ax, (xl, yl) in zip(axes, [("epoch", "test accuracy %"), ("wall time s (simulated devices)", "test accuracy %"),
                                    ("epoch", "train loss")]):
        ax.set_xlabel(xl), ax.set_ylabel(yl), ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    p.add_argument("--seeds", type=ints, default=[0])
    p.add_argument("--stages", type=ints, default=[2, 4])
    p.add_argument("--data-parallel", type=ints, default=[2])
    p.add_argument("--shrink", type=floats, default=[1.0])
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--train-examples", type=int)
    p.add_argument("--eval-examples", type=int)
    p.add_argument("--staleness-power", type=float, help="FDBP staleness control (default: the CLI's; 0: off)")
    p.add_argument("--out", default="runs/compare")
    args = p.parse_args(argv)
    runs = [(f"{c.algorithm}-K{c.stages}-N{c.data_parallel}-b{c.shrink:g}-s{c.seed}", c) for c in grid(args)]
    results = [r for r in run_grid(runs, args.out) if r["diverged"] is None]
    plot(results, os.path.join(args.out, "accuracy.png"))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(script_exit(main, "compare.py"))
