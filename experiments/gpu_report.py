"""Tables and plots from training runs on disk, offline: a `gpu_study.py` output folder, folders of
`fdbp-train` runs (metrics.jsonl + summary.json), or several of them.

    python experiments/gpu_report.py ../shared/gpu-runs docs/data/gpu-study-2026-11-27 --out docs/figures/gpu

Writes into --out: report.md (every run, then every FDBP run against the BP run of the same recipe:
accuracy and train-loss gaps at equal updates), curves.png (test accuracy and train loss against
epochs, one column per source folder) and gap.png (the gaps against updates, log scale).
"""

from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fdbp_jax import results  # noqa: E402

RUN_COLUMNS = (("source", "source", "s"), ("run", "name", "s"), ("model", "model", "s"), ("method", "method", "s"),
               ("N", "N", "d"), ("lr", "lr", "g"), ("seed", "seed", "d"), ("train images", "train_images", ","),
               ("epochs", "epochs", "d"), ("updates", "updates", ","), ("test acc %", "accuracy", ".2f"),
               ("train loss", "train_loss", ".3f"), ("images/s", "images_per_s", ",.0f"))
GAP_COLUMNS = (("model", "model", "s"), ("lr", "lr", "g"), ("N", "N", "d"), ("seed", "seed", "d"),
               ("train images", "train_images", ","), ("method", "method", "s"), ("split", "split", "s"),
               ("updates", "updates", ","),
               ("BP acc %", "bp_accuracy", ".2f"), ("FDBP acc %", "fdbp_accuracy", ".2f"),
               ("gap (points)", "accuracy_gap", ".2f"), ("train loss gap", "train_loss_gap", "+.3f"),
               ("source", "source", "s"))


def run_row(run: results.Run) -> dict:
    c, last = run.config, run.final
    return {"source": os.path.basename(run.source), "name": run.name, "model": c["model"], "method": run.method,
            "N": c["data_parallel"], "lr": c["lr"], "seed": c["seed"], "train_images": c.get("train_examples") or 50000,
            "epochs": last.get("epoch"), "updates": last.get("tick"),
            "accuracy": None if not last else 100 * last["test_accuracy"], "train_loss": last.get("train_loss"),
            "images_per_s": last.get("images_per_s")}


def percent(row: dict) -> dict:
    out = dict(row, source=os.path.basename(row["source"]))
    for key in ("bp_accuracy", "fdbp_accuracy", "accuracy_gap"):
        out[key] = None if row[key] is None else 100 * row[key]
    return out


def plot_curves(runs: list[results.Run], path: str) -> None:
    """Test accuracy and train loss per epoch, a column per source; colour = recipe, line = method."""
    sources = sorted({run.source for run in runs})
    fig, axes = plt.subplots(2, len(sources), figsize=(5 * len(sources), 7), squeeze=False)
    styles = {"BP": "-", "FDBP K=4": "--", "FDBP K=4 plain": ":", "FDBP K=2": "-."}
    for column, source in enumerate(sources):
        here = [r for r in runs if r.source == source]
        recipes = list(dict.fromkeys(r.recipe for r in here))  # a BP run and its FDBP runs share a colour
        for run in here:
            epochs = [e["epoch"] for e in run.evals]
            style = dict(color=plt.cm.tab10(recipes.index(run.recipe) % 10), ls=styles.get(run.method, "--"),
                         label=run.name)
            axes[0, column].plot(epochs, [100 * e["test_accuracy"] for e in run.evals], **style)
            axes[1, column].plot(epochs, [e["train_loss"] for e in run.evals], **style)
        axes[0, column].set_title(os.path.basename(source))
        axes[0, column].set_ylabel("test accuracy %")
        axes[1, column].set_ylabel("train loss")
        axes[1, column].set_xlabel("epoch")
        axes[0, column].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gaps(rows: list[dict], path: str) -> None:
    """Each pair's gaps at the end of its run against its updates: colour = model and lr, marker = method
    and N (filled: N=1, hollow: N=2)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    recipes = sorted({(r["model"], r["lr"]) for r in rows})
    colours = {recipe: plt.cm.tab10(i % 10) for i, recipe in enumerate(recipes)}
    markers = {"FDBP K=4": "o", "FDBP K=4 plain": "s", "FDBP K=2": "^"}
    seen = set()
    for row in rows:
        colour = colours[(row["model"], row["lr"])]
        style = dict(marker=markers.get(row["method"], "D"), s=36, edgecolors=colour,
                     facecolors=colour if row["N"] == 1 else "none")
        label = f"{row['model']} lr {row['lr']:g}, {row['method']}, N={row['N']}"
        for ax, key in zip(axes, ("accuracy_gap", "train_loss_gap")):
            if row[key] is not None:
                ax.scatter(row["updates"], row[key], label=None if label in seen else label, **style)
        seen.add(label)
    for ax, name in zip(axes, ("test accuracy gap, BP − FDBP (points)", "train loss gap, FDBP − BP")):
        ax.set_xscale("log")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("updates (global batches of 128) in the run")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", help="gpu_study output folders, run folders, or folders of them")
    p.add_argument("--out", default="runs/report")
    args = p.parse_args(argv)
    runs = [run for path in args.paths for run in results.load_runs(path) if run.evals]
    if not runs:
        p.error(f"no runs with eval events under {', '.join(args.paths)}")
    os.makedirs(args.out, exist_ok=True)
    gaps = [percent(results.gap_row(bp, fdbp)) for bp, fdbp in results.pairs(runs)]
    gaps.sort(key=lambda r: (r["updates"], r["model"], r["lr"], r["seed"]))
    report = ["## Runs", "", results.markdown_table([run_row(r) for r in runs], RUN_COLUMNS), "",
              "## FDBP against BP of the same recipe (equal updates)", "",
              results.markdown_table(gaps, GAP_COLUMNS), ""]
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("\n".join(report))
    plot_curves(runs, os.path.join(args.out, "curves.png"))
    if gaps:
        plot_gaps(gaps, os.path.join(args.out, "gap.png"))
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
