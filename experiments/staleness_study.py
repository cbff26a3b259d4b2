"""Does FDBP stay stable at the paper's learning rate, with and without the staleness control?

    python experiments/staleness_study.py --seeds 0,1,2 --stages 2,3,4 --controls off,default \
        --out runs/staleness

ResNet-20 on a CIFAR-10 subset, SGD lr 0.1, momentum 0.9, weight decay 5e-4, constant step size and
no learning-rate warm-up (nothing else tames the first updates), N = 2 replicas. BP (same N) is the
reference. A control is `off` (plain FDBP), `default` (the CLI default) or `p<power>w<warmup>`, e.g.
`p1w0`, `p0.5w5` (see fdbp_jax.optim). A run whose gradient turns non-finite is recorded as diverged
with its tick. Writes <out>/results.json and <out>/staleness.png (train loss and test accuracy per
epoch, mean over seeds, one panel per K with BP in each) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys

import numpy as np

from fdbp_jax.config import Config
from fdbp_jax.runner import run_grid, script_exit

ints = lambda s: [int(v) for v in s.split(",") if v]
CONTROL = re.compile(r"p(?P<power>[0-9.]+)w(?P<warmup>[0-9]+)")


def control_settings(name: str) -> dict:
    """`off` | `default` | `p<power>w<warmup>` -> the Config fields it sets."""
    if name == "off":
        return dict(staleness_power=0.0, staleness_warmup=0)
    match = CONTROL.fullmatch(name)
    if not match:
        raise SystemExit(f"--controls {name}: use off, default or p<power>w<warmup> (e.g. p0.5w5)")
    return dict(staleness_power=float(match["power"]), staleness_warmup=int(match["warmup"]))


def default_control_name() -> str:
    defaults = Config()
    if not (defaults.staleness_power or defaults.staleness_warmup):
        return "off"
    return f"p{defaults.staleness_power:g}w{defaults.staleness_warmup}"


def grid(args) -> list[tuple[str, Config]]:
    base = Config(model="resnet20", data_parallel=2, epochs=args.epochs, batch_size=128, lr=args.lr, momentum=0.9,
                  weight_decay=5e-4, schedule="constant", warmup_epochs=0.0, train_examples=args.train_examples,
                  eval_examples=args.eval_examples)
    runs = []
    for seed in args.seeds:
        if not args.no_bp:
            runs.append(("BP", dataclasses.replace(base, algorithm="bp", stages=1, seed=seed)))
        for k in args.stages:
            for control in args.controls:
                control = default_control_name() if control == "default" else control
                runs.append((f"FDBP K={k} {control}", dataclasses.replace(
                    base, algorithm="fdbp", stages=k, seed=seed, **control_settings(control))))
    return runs


def table(results: list[dict]) -> str:
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["name"], []).append(r)
    lines = ["| run | seeds | diverged | test acc % | final train loss |", "|---|---|---|---|---|"]
    for name, rs in groups.items():
        ok = [r for r in rs if r["diverged"] is None]
        acc = np.array([r["test_accuracy"] for r in ok]) * 100
        loss = np.array([r["final_train_loss"] for r in ok])
        lines.append(
            f"| {name} | {len(rs)} | {len(rs) - len(ok)} | "
            + (f"{acc.mean():.2f} ± {acc.std():.2f} | {loss.mean():.3f} ± {loss.std():.3f} |" if ok else "— | — |")
        )
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = [r for r in results if r["diverged"] is None]
    stages = sorted({r["config"]["stages"] for r in finished if r["config"]["algorithm"] == "fdbp"})
    fig, axes = plt.subplots(2, len(stages), figsize=(5 * len(stages), 7), squeeze=False)
    for column, K in enumerate(stages):
        names = sorted({r["name"] for r in finished if r["name"] == "BP" or r["name"].startswith(f"FDBP K={K} ")})
        for i, name in enumerate(names):
            histories = [r["history"] for r in finished if r["name"] == name]
            epochs = [e["epoch"] for e in histories[0]]
            for row, field, scale in ((0, "train_loss", 1), (1, "test_accuracy", 100)):
                mean = np.mean([[scale * e[field] for e in h] for h in histories], axis=0)
                axes[row][column].plot(epochs, mean, "o-", color=f"C{i}", label=f"{name} ({len(histories)} seeds)")
        axes[0][column].set(title=f"K={K}, N=2", ylabel="train loss")
        axes[1][column].set(xlabel="epoch", ylabel="test accuracy %")
        for ax in axes[:, column]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=ints, default=[0, 1, 2])
    p.add_argument("--stages", type=ints, default=[2, 3, 4])
    p.add_argument("--controls", type=lambda s: s.split(","), default=["off", "default"])
    p.add_argument("--no-bp", action="store_true", help="skip the BP reference runs")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-examples", type=int, default=5000)
    p.add_argument("--eval-examples", type=int, default=1000)
    p.add_argument("--out", default="runs/staleness")
    args = p.parse_args(argv)
    results = run_grid([(f"{name} s{c.seed}", c) for name, c in grid(args)], args.out)
    for r in results:
        r["name"] = r["name"].rsplit(" s", 1)[0]  # the table and plot group seeds under one name
    plot(results, os.path.join(args.out, "staleness.png"))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(script_exit(main, "staleness_study.py"))
