"""Speed-model predictions from measured efficiency curves: time per global batch and time to a test
accuracy for data-parallel BP over D devices, and for FDBP and the synchronous pipelines (GPipe and
1F1B, M micro-batches, each by its timetable's lock-step ticks) with K stages x N = D/K replicas.

    python experiments/predict_speedup.py --costs docs/data/gpu-study-2026-11-27a/costs.json \
        --runs ../shared/gpu-runs/resnet20-20ep docs/data/gpu-study-2026-11-27b --target 0.8

Measured: each stage's tick work and the BP step against the per-device batch (`--costs`, from
`experiments/measure_costs.py` on one device), and the ticks each method needed to reach --target
(`--runs`: training runs of the same model at the same global batch, on one device; N changes only
BatchNorm's statistics, so they stand for any N; GPipe and 1F1B are exactly backprop, so they need
BP's ticks). Modeled: devices working at once with no
interference, the link (--link-gbps, --latency-us; default NVLink-class numbers, not measured here),
ring all-reduces, and float32 messages.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from fdbp_jax import perf, results
from fdbp_jax.engines import pipeline_timetable

PIPELINES = (("gpipe", "GPipe"), ("1f1b", "1F1B"))  # (algorithm, label): each timed by its own timetable

COLUMNS = (("devices", "devices", "d"), ("global batch", "batch", "d"), ("method", "method", "s"),
           ("per-device (micro-)batch", "local_batch", "g"), ("ms / global batch", "ms", ".3f"),
           ("images/s", "images_per_s", ",.0f"), ("vs BP", "vs_bp", ".2f"), ("vs 1 device", "vs_single", ".2f"),
           ("ticks to target", "ticks", ","), ("time to target s", "time_to_target", ".1f"))


def ticks_to_target(runs: list[results.Run], model: str, batch: int, target: float) -> dict[str, int | None]:
    """Median ticks to `target` of each method ("BP", "FDBP K=4", ...) among runs of `model` at `batch`."""
    by_method: dict[str, list] = {}
    for run in runs:
        if run.config["model"] == model and run.config["batch_size"] == batch:
            by_method.setdefault(run.method, []).append(perf.ticks_to_accuracy(run.evals, target))
    return {m: None if None in ticks else int(statistics.median(ticks)) for m, ticks in by_method.items()}


def predictions(measured: dict, devices: list[int], batches: list[int], link: perf.Link,
                ticks: dict[int, dict[str, int | None]], microbatches: tuple[int, ...] = (4, 8, 16)) -> list[dict]:
    """One row per (devices, global batch, method) the measurement covers."""
    step, param_bytes = perf.bp_costs(measured)
    splits = {int(K): perf.stage_costs(measured, int(K)) for K, s in measured["splits"].items() if s["stages"][0]["tick"]}
    rows = []
    for batch in batches:
        single = step(batch)
        for D in devices:
            layouts = [("BP", D, batch / D, perf.bp_step_time(step, param_bytes, batch, D, link))]
            for K, stages in sorted(splits.items(), reverse=True):
                if D % K == 0:
                    N = D // K
                    layouts.append((f"FDBP K={K}", N, batch / N, perf.fdbp_tick_time(stages, batch, N, link)))
                    for M in microbatches:
                        if batch % (N * M) == 0:
                            for algorithm, name in PIPELINES:
                                layouts.append((f"{name} K={K} M={M}", N, batch / (N * M), perf.pipeline_step_time(
                                    stages, batch, N, pipeline_timetable(algorithm, K, M), link)))
            bp_seconds = layouts[0][3]
            for method, replicas, local_batch, seconds in layouts:
                label = method if method == "BP" else f"{method} x N={replicas}"
                exactly_bp = method.startswith(tuple(name for _, name in PIPELINES))
                ticks_needed = ticks.get(batch, {}).get("BP" if exactly_bp else method)
                rows.append({
                    "devices": D, "batch": batch, "method": label, "local_batch": local_batch,
                    "ms": 1e3 * seconds, "images_per_s": batch / seconds, "vs_bp": bp_seconds / seconds,
                    "vs_single": single / seconds, "ticks": ticks_needed,
                    "time_to_target": None if ticks_needed is None else ticks_needed * seconds,
                })
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--costs", required=True, help="a measure_costs.py JSON")
    p.add_argument("--runs", nargs="*", default=[], help="training runs (folders) giving ticks to --target")
    p.add_argument("--target", type=float, default=0.8, help="test accuracy, a fraction")
    p.add_argument("--devices", default="4,8,16,32")
    p.add_argument("--batches", default="128,512", help="global batches")
    p.add_argument("--microbatches", default="4,8,16", help="GPipe/1F1B micro-batches per global batch")
    p.add_argument("--link-gbps", type=float, default=450.0, help="modeled link bandwidth each way, GB/s")
    p.add_argument("--latency-us", type=float, default=10.0, help="modeled per-message latency, microseconds")
    p.add_argument("--out", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    measured = perf.load_costs(args.costs)
    link = perf.Link(args.link_gbps * 1e9, args.latency_us * 1e-6)
    runs = [run for path in args.runs for run in results.load_runs(path)]
    batches = [int(b) for b in args.batches.split(",")]
    ticks = {b: ticks_to_target(runs, measured["model"], b, args.target) for b in batches}
    rows = predictions(measured, [int(d) for d in args.devices.split(",")], batches, link, ticks,
                       tuple(int(m) for m in args.microbatches.split(",")))
    where = measured["provenance"]
    print(f"{measured['model']} on {where['device_kind']} ({where['platform']}, jax {where['jax']}, {where['date']}); "
          f"link modeled at {args.link_gbps:g} GB/s, {args.latency_us:g} us; target {100 * args.target:g} %")
    print(results.markdown_table(rows, COLUMNS))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"costs": args.costs, "link_gbps": args.link_gbps, "latency_us": args.latency_us,
                       "target": args.target, "runs": args.runs, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
