"""Deep decoupled pipelines: FDBP at K = 4, 8, 16 against BP, with each staleness correction.

    python experiments/deep_study.py --stages 4,8 --corrections none,control,predict,lookahead \
        --seeds 0 --out runs/deep/main
    python experiments/deep_study.py --report runs/deep/main runs/deep/seed1 --out docs/data/deep-study

A run is `fdbp-train --model vit` (patch embedding, 16 uniform transformer blocks, head: 1.2 M
parameters; LayerNorm, so no statistic depends on how a batch is split and BP and FDBP normalise
alike) in the exact single-device emulator (`--emulate`, equal to the mesh engine in the contract
suite), N = 1, global batch 128, SGD lr 0.05 momentum 0.9 weight decay 5e-4, cosine with a half-epoch
warm-up. Corrections: `none` (plain FDBP), `control` (the default step-size control, power 1),
`predict` and `lookahead` (each with the control). `--workers i/n` runs every n-th run from the i-th,
so n processes pinned to n cores share a grid (each writes its own --out). `--report` reads the
results of earlier runs, writes <out>/results.json (all rows), <out>/deep-study.png (test accuracy
and train loss per epoch) and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np

from fdbp_jax.config import Config
from fdbp_jax.runner import run_grid, script_exit

ints = lambda s: [int(v) for v in s.split(",") if v]
CORRECTIONS = {  # study name -> the Config fields it sets
    "none": dict(staleness_power=0.0, correction="none"),
    "control": dict(staleness_power=1.0, correction="none"),
    "predict": dict(staleness_power=1.0, correction="predict"),
    "lookahead": dict(staleness_power=1.0, correction="lookahead"),
}


def base_config(args) -> Config:
    return Config(model="vit", data_parallel=1, emulate=True, epochs=args.epochs, batch_size=128, lr=0.05,
                  momentum=0.9, weight_decay=5e-4, schedule="cosine", warmup_epochs=0.5,
                  train_examples=args.train_examples, eval_examples=args.eval_examples, tensorboard=False)


def grid(args) -> list[tuple[str, Config]]:
    base, runs = base_config(args), []
    for seed in args.seeds:
        if not args.no_bp:
            runs.append((f"BP s{seed}", dataclasses.replace(base, algorithm="bp", stages=1, seed=seed)))
        for k in args.stages:
            for name in args.corrections:
                if name not in CORRECTIONS:
                    raise ValueError(f"--corrections {name}: unknown; valid: {', '.join(CORRECTIONS)}")
                runs.append((f"FDBP K={k} {name} s{seed}", dataclasses.replace(
                    base, algorithm="fdbp", stages=k, seed=seed, **CORRECTIONS[name])))
    return runs


def group_name(row: dict) -> str:
    """A row's name without its seed, and with its budget (training examples x epochs)."""
    c = row["config"]
    return f"{row['name'].rsplit(' s', 1)[0]} @{c['train_examples'] * c['epochs'] / 1000:g}k"


def order(row: dict) -> tuple:
    """Table order: budget (largest first), BP first, then K, then the corrections as in CORRECTIONS."""
    c, method = row["config"], row["name"].rsplit(" s", 1)[0].split()[-1]
    budget = -c["train_examples"] * c["epochs"]
    if c["algorithm"] == "bp":
        return budget, 0, 0, 0
    return budget, 1, c["stages"], list(CORRECTIONS).index(method)


def table(results: list[dict]) -> str:
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(group_name(r), []).append(r)
    lines = ["| run | budget (images) | seeds | test acc % | final train loss | vs BP (points) |",
             "|---|---|---|---|---|---|"]
    for name, rs in sorted(groups.items(), key=lambda kv: order(kv[1][0])):
        ok = [r for r in rs if r["diverged"] is None]
        budget = name.split("@")[1]
        bp = [r["test_accuracy"] for k, g in groups.items() if k == f"BP @{budget}" for r in g]
        acc = np.array([r["test_accuracy"] for r in ok]) * 100
        loss = np.array([r["final_train_loss"] for r in ok])
        if not ok:
            lines.append(f"| {name.split(' @')[0]} | {budget} | {len(rs)} | diverged | — | — |")
            continue
        gap = f"{acc.mean() - 100 * np.mean(bp):+.2f}" if bp and not name.startswith("BP") else "—"
        spread = lambda a: f"{a.mean():.2f} ± {a.std():.2f}" if len(a) > 1 else f"{a.mean():.2f}"
        lines.append(f"| {name.split(' @')[0]} | {budget} | {len(rs)} | {spread(acc)} | "
                     f"{loss.mean():.3f} | {gap} |")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = [r for r in results if r["diverged"] is None]
    names = sorted({group_name(r) for r in finished})
    max_budget = max(r["config"]["train_examples"] * r["config"]["epochs"] for r in finished) / 1000
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for i, name in enumerate(names):
        histories = [r["history"] for r in finished if group_name(r) == name]
        epochs = [e["epoch"] for e in histories[0]]
        style = "-" if name.endswith(f"@{max_budget:g}k") else "--"
        for ax, field, scale in ((axes[0], "test_accuracy", 100), (axes[1], "train_loss", 1)):
            mean = np.mean([[scale * e[field] for e in h] for h in histories], axis=0)
            ax.plot(epochs, mean, "o" + style, color=plt.cm.tab20(i % 20), label=f"{name} ({len(histories)} seeds)")
    axes[0].set(xlabel="epoch", ylabel="test accuracy %", title="ViT (16 blocks), CIFAR-10 subset, emulator")
    axes[1].set(xlabel="epoch", ylabel="train loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def report(sources: list[str], out: str) -> list[dict]:
    results = [r for source in sources for r in json.load(open(os.path.join(source, "results.json")))]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(out, "deep-study.png"))
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=ints, default=[0])
    p.add_argument("--stages", type=ints, default=[4, 8])
    p.add_argument("--corrections", type=lambda s: s.split(","), default=list(CORRECTIONS))
    p.add_argument("--no-bp", action="store_true", help="skip the BP reference runs")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-examples", type=int, default=10000)
    p.add_argument("--eval-examples", type=int, default=2000)
    p.add_argument("--workers", default="0/1", help="i/n: run every n-th run of the grid from the i-th")
    p.add_argument("--report", nargs="+", metavar="DIR", help="merge the results of these --out folders")
    p.add_argument("--out", default="runs/deep")
    args = p.parse_args(argv)
    if args.report:
        results = report(args.report, args.out)
    else:
        index, count = map(int, args.workers.split("/"))
        results = run_grid(grid(args)[index::count], args.out)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(script_exit(main, "deep_study.py"))
