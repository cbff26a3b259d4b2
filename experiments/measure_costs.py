"""Measure a model's efficiency curves on this machine's first device (`fdbp_jax.costs`): each
stage's forward and tick work for K-stage splits, and the whole model's BP step, at per-device
batches 8..256. Writes one JSON the speed model reads (`experiments/predict_speedup.py --costs`).

    python experiments/measure_costs.py --model resnet20 --stages 4,2 --out docs/data/costs-cpu-resnet20.json

The file is rewritten after every batch, so a run stopped by --budget-s (or killed) leaves the curves
measured so far.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from fdbp_jax import costs


def write_json(path: str, value: dict) -> None:
    """Replace `path` atomically: a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--stages", default="4,2", help="the K to measure, comma-separated")
    p.add_argument("--batches", default=",".join(map(str, costs.BATCHES)))
    p.add_argument("--repeats", type=int, default=30, help="timed calls per measurement (the median is kept)")
    p.add_argument("--budget-s", type=float, help="start no new batch after this many seconds")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    deadline = None if args.budget_s is None else time.time() + args.budget_s
    result = costs.measure_model(
        args.model, [int(k) for k in args.stages.split(",")], [int(b) for b in args.batches.split(",")],
        args.repeats, deadline=deadline, on_progress=lambda r: write_json(args.out, r),
    )
    write_json(args.out, result)
    print(f"wrote {args.out}: {len(result['bp_step'])} batches measured on {result['provenance']['device_kind']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
