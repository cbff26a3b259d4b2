"""The experiments' runner: a grid of named configs -> one training each (the data loaded once, the
devices simulated on a CPU-only machine) -> results.json rewritten after every run, so a rerun skips
what is done -> the rows the caller turns into its table and plot (experiments/compare.py,
experiments/staleness_study.py)."""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Callable, Sequence

import jax

from fdbp_jax.cli import simulate_devices
from fdbp_jax.config import Config
from fdbp_jax.data import DatasetUnavailable
from fdbp_jax.train import Diverged, load_datasets, train_and_evaluate


def run_grid(runs: Sequence[tuple[str, Config]], out: str, datasets=None) -> list[dict]:
    """Train every (name, config) not already in <out>/results.json; returns every row: its name,
    "diverged" (None, or the reason a non-finite gradient stopped it) and the run's summary."""
    simulate_devices(max(1 if c.emulate else c.stages * c.data_parallel for _, c in runs))
    print(f"{len(runs)} runs on {len(jax.devices())} {jax.default_backend()} devices", flush=True)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else []
    done = {(r["name"], json.dumps(r["config"], sort_keys=True)) for r in results}
    for name, config in runs:
        if (name, json.dumps(config.to_json(), sort_keys=True)) in done:
            continue
        datasets = datasets or load_datasets(config)
        print(f"== {name}", flush=True)
        workdir = os.path.join(out, re.sub(r"[^A-Za-z0-9.=-]+", "_", name))
        try:
            summary = train_and_evaluate(config, workdir, overwrite=True, datasets=datasets, show_progress=False).summary
            results.append({"name": name, "diverged": None, **summary})
            print(f"   test acc {100 * summary['test_accuracy']:.2f}  train loss {summary['final_train_loss']:.3f}",
                  flush=True)
        except Diverged as err:
            results.append({"name": name, "diverged": str(err), "config": config.to_json()})
            print(f"   diverged: {err}", flush=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
    return results


def script_exit(main: Callable[[], int], script: str) -> int:
    """An experiment script's exit status: `main()`'s, or, where the data can be neither found nor
    downloaded or a setting is bad, that reason in one line (what is wrong and what to do) and 2."""
    try:
        return main()
    except (DatasetUnavailable, ValueError) as err:
        print(f"{script}: {err}", file=sys.stderr, flush=True)
        return 2
