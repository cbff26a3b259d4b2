"""Speed measured on real parallel workers: P processes, one device each (on CPU each pinned to its own
core with taskset; on a GPU host one process per GPU), joined by jax.distributed, through the public API.

    python experiments/bench_workers.py [--processes 2] [--model resnet20] [--batch 128] [--steps 10]
        [--microbatches 4] [--configs bp1,bp,fdbp-recompute,...] [--split-unit auto|block|half-block]
        [--rounds 1] [--lockstep] [--check-model] [--system-malloc] [--out runs/workers]

For one model and global batch it times BP on 1 worker (beside an identical independent twin on the
other worker's core, so both sides of the ratio see the same machine), data-parallel BP on P workers,
FDBP K=P with every stash, GPipe and 1F1B K=P with each M: median seconds per global batch after warm-up
(and every timed step's, on every process), images/s, speedup over 1 worker, and where the time of a
step goes on every process: placing the input batch, the host's dispatch of the step, the wait for its
devices (compute, collectives and waiting for peers); and over the timed steps, the process's CPU time
(on a pinned worker, its busy time against its idle wait), its page faults and context switches, and the
CPU time of each of its threads by name (XLA's compute threads, Python's, the runtime's). With P > 1 it
also measures the links it uses: a ppermute of one stage message and an all-reduce of the largest
stage's gradient between the processes. With --check-model it measures the speed model's curves on one
worker and puts `fdbp_jax.perf`'s prediction of every row beside its measurement. With --rounds R it
measures every configuration R times, round by round, and gives each row's speedup against its own
round's 1-worker baseline, then the median and range over the rounds (and each algorithm's best
configuration per round: FDBP's best stash): a machine whose speed drifts over minutes (shared hosts)
moves a row and a baseline measured minutes apart, not a round's. With --lockstep each multi-worker
configuration's P processes run beside P 1-worker baseline twins pinned to the same cores, each process
alone in its own process as in separate launches, but in turn: one step of the configuration on every
core, then one step of every twin, driven from here; each step's speedup is against the baseline step
right after it, so a slowdown of the machine that lasts seconds moves both sides of the ratio.
Writes <out>/workers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

CONFIGS = {  # name -> (algorithm, workers: 1 or P, stash, microbatches); K = P for the pipelined ones
    "bp1": ("bp", 1, "recompute", 1),
    "bp": ("bp", None, "recompute", 1),
    "fdbp-recompute": ("fdbp", None, "recompute", 1),
    "fdbp-selective": ("fdbp", None, "selective", 1),
    "fdbp-residuals": ("fdbp", None, "residuals", 1),
    "gpipe": ("gpipe", None, "recompute", None),
    "1f1b": ("1f1b", None, "recompute", None),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and os.environ.get("JAX_PLATFORMS", "") not in ("cpu",)


def worker_process(command: list[str], worker: int) -> tuple[list[str], dict]:
    """`command` as worker `worker`'s process, and its environment: pinned to core `worker` (CPU), or
    given GPU `worker` alone; the repository on its PYTHONPATH."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if on_gpu():
        env["CUDA_VISIBLE_DEVICES"] = str(worker)
    elif shutil.which("taskset"):
        command = ["taskset", "-c", str(worker % os.cpu_count()), *command]
    return command, env


def start(settings: dict, processes: int, worker_ids: list[int]) -> list[subprocess.Popen]:
    """One worker process per id (pinned to core `id`, or given GPU `id`). With `processes` > 1 they are
    joined by jax.distributed; with 1, each is an independent twin. A lockstep worker takes its turns
    on stdin; stderr goes to a file, so that a long run cannot fill its pipe."""
    port, procs = free_port(), []
    for rank, worker in enumerate(worker_ids):
        command, env = worker_process(
            [sys.executable, os.path.abspath(__file__), "--worker",
             json.dumps({**settings, "processes": processes, "rank": rank if processes > 1 else 0, "port": port})],
            worker,
        )
        log = tempfile.TemporaryFile("w+")
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=log,
                                      stdin=subprocess.PIPE if settings.get("lockstep") else None, text=True))
        procs[-1].log = log
    return procs


def failure(proc: subprocess.Popen, name: str) -> RuntimeError:
    """A worker's failure, with the end of its stderr."""
    proc.log.seek(0)
    return RuntimeError(f"a worker of {name} failed ({proc.returncode}): {proc.log.read()[-3000:]}")


def finish(procs: list[subprocess.Popen], name: str) -> list[dict]:
    """Each worker's JSON result (its last line), once it has ended. Every lockstep worker is released
    first: a process that exits waits in jax.distributed's shutdown for the others."""
    for proc in procs:
        if proc.stdin:
            proc.stdin.close()
    results = []
    for proc in procs:
        out = proc.stdout.read()  # through the buffer `expect` read from, not `communicate`'s raw pipe
        proc.wait(timeout=1800)
        if proc.returncode != 0:
            raise failure(proc, name)
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def launch(settings: dict, processes: int, worker_ids: list[int]) -> list[dict]:
    """Start one worker process per id and let it run; their JSON results."""
    return finish(start(settings, processes, worker_ids), settings["name"])


def expect(procs: list[subprocess.Popen], line: str, name: str) -> None:
    """Wait for every lockstep worker of `procs` to say `line` (passing over what else their runtimes
    print, such as gloo's connection lines)."""
    for proc in procs:
        said = proc.stdout.readline()
        while said and said.strip() != line:
            said = proc.stdout.readline()
        if not said:  # it ended without saying it
            proc.wait()
            raise failure(proc, name)


def launch_lockstep(settings: dict, baseline: dict, processes: int) -> tuple[list[dict], list[dict]]:
    """The configuration's `processes` workers and as many 1-worker `baseline` twins on the same cores,
    in turn: one step of every worker, then one of every twin, as many times as the settings' warm-up
    and timed steps (each waits for its turn blocked on stdin, idle). The twins start once the workers are ready, so that they do not disturb
    what the workers measure before their first step (the split's timing), and the workers measure
    their links and exit only once the twins' last step is over. Both groups' JSON results."""
    ids, started = list(range(processes)), []
    try:
        workers = start({**settings, "lockstep": True}, processes, ids)
        started += workers
        expect(workers, "ready", settings["name"])
        twins = start({**baseline, "lockstep": True}, 1, ids)
        started += twins
        expect(twins, "ready", baseline["name"])
        for _ in range(settings["warmup"] + settings["steps"]):  # the turns each worker loops over
            for group, name in ((workers, settings["name"]), (twins, baseline["name"])):
                for proc in group:
                    try:
                        proc.stdin.write("step\n")
                        proc.stdin.flush()
                    except BrokenPipeError:  # it has ended
                        proc.wait()
                        raise failure(proc, name) from None
                expect(group, "stepped", name)
        return finish(workers, settings["name"]), finish(twins, baseline["name"])
    finally:  # a worker that failed leaves none of the others waiting for a turn
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def keep_memory(settings: dict) -> bool:
    """Before JAX starts its backend, as `fdbp-train` does: glibc malloc keeps what it frees in a worker
    with one CPU device, unless --system-malloc asked for its defaults. Whether it does."""
    from fdbp_jax import host_memory

    return (not settings["system_malloc"] and host_memory.keeps_freed_memory_by_default(1)
            and host_memory.keep_freed_memory())


TASKS = "/proc/self/task"  # Linux: one folder per thread of this process


def thread_ids() -> list[str]:
    """This process's threads (Linux's `TASKS`; [] elsewhere)."""
    return os.listdir(TASKS) if os.path.isdir(TASKS) else []


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + kernel) this process's threads have used, summed by thread name (`thread_ids`;
    {} elsewhere): which threads take a pinned worker's core."""
    totals: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for tid in thread_ids():
        try:
            with open(f"{TASKS}/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # the thread ended
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        totals[name] = totals.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return totals


class Usage:
    """What a worker's timed steps used, summed over them (and nothing of what ran between them): the
    process's CPU time (user + kernel, all threads; on a worker pinned to one core its step time less
    this is time the core idled, waiting for the peer or the link), its page faults (fresh memory the
    kernel zeroes), its context switches, voluntary (a thread blocked: a peer, a lock, the link) and
    involuntary (preempted: more runnable threads than the core runs), and the CPU time of each thread
    by name (`thread_cpu`)."""

    COUNTERS = (("minor_faults", "ru_minflt"), ("voluntary_switches", "ru_nvcsw"),
                ("involuntary_switches", "ru_nivcsw"))

    def __init__(self):
        self.cpu_s, self.counters, self.threads = 0.0, dict.fromkeys(dict(self.COUNTERS), 0), {}

    @staticmethod
    def now() -> tuple:
        times = os.times()
        return times.user + times.system, resource.getrusage(resource.RUSAGE_SELF), thread_cpu()

    def add(self, before: tuple, after: tuple) -> None:
        self.cpu_s += after[0] - before[0]
        for name, field in self.COUNTERS:
            self.counters[name] += getattr(after[1], field) - getattr(before[1], field)
        for name, seconds in after[2].items():
            self.threads[name] = self.threads.get(name, 0.0) + seconds - before[2].get(name, 0.0)

    def per_step(self, steps: int) -> dict:
        return {"cpu_ms_per_step": 1e3 * self.cpu_s / steps,
                "kernel_per_step": {name: count / steps for name, count in self.counters.items()},
                "thread_cpu_ms_per_step": {name: 1e3 * seconds / steps for name, seconds in self.threads.items()
                                           if seconds > 0}}


def run_worker(settings: dict) -> int:
    """One worker: build the configuration through the public API, time its steps, print JSON."""
    kept_memory = keep_memory(settings)
    import jax

    jax.config.update("jax_num_cpu_devices", 1)
    from fdbp_jax import distributed

    if settings["processes"] > 1:
        distributed.initialize(f"127.0.0.1:{settings['port']}", settings["processes"], settings["rank"])
    import numpy as np
    import optax

    import fdbp_jax as fj
    from fdbp_jax import costs, models
    from fdbp_jax.engines import split_stash
    from fdbp_jax.losses import cross_entropy

    P, B = jax.device_count(), settings["batch"]
    algorithm, stash, M = settings["algorithm"], settings["stash"], settings["microbatches"]
    K = 1 if algorithm == "bp" else P
    mesh = fj.make_mesh(P, 1) if algorithm == "bp" else fj.make_mesh(1, K)
    local = B // (P if algorithm == "bp" else 1)
    blocks = models.model_blocks(settings["model"], split_unit=settings["split_unit"])
    split = fj.split_blocks(blocks, K, np.zeros((local, 32, 32, 3), np.float32),
                            settings["boundaries"] if K > 1 else None, measure=settings["measure"],
                            stash=split_stash(algorithm, stash))
    trainer = fj.Trainer(split.stages, cross_entropy, optax.sgd(0.05, momentum=0.9), mesh=mesh,
                         algorithm=algorithm, stash=stash, microbatches=M)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, size=B).astype(np.int32)
    rows = trainer.local_rows(B)
    x_local, y_local = x[rows.start:rows.stop], y[rows.start:rows.stop]
    state = trainer.init(jax.random.key(0), x)
    parts = {"input": [], "dispatch": [], "wait": []}
    used = Usage()
    lockstep = settings.get("lockstep")
    if lockstep:
        print("ready", flush=True)
    for i in range(settings["warmup"] + settings["steps"]):
        timed = i >= settings["warmup"]
        if lockstep:  # this core's turn: the other program on it has finished its step
            sys.stdin.readline()
        before = Usage.now() if timed else None  # warm-up steps are not counted: no /proc reads for them
        start = time.perf_counter()
        batch = trainer.global_batch(B, x_local, y_local)
        placed = time.perf_counter()
        state, metrics = trainer.step(state, *batch)
        dispatched = time.perf_counter()
        jax.block_until_ready((state, metrics))
        done = time.perf_counter()
        if timed:
            used.add(before, Usage.now())
            for name, seconds in (("input", placed - start), ("dispatch", dispatched - placed), ("wait", done - dispatched)):
                parts[name].append(seconds)
        if lockstep:
            print("stepped", flush=True)
    if lockstep:  # nothing more (the links, the exit) until the driver ends the turns: the twins' steps are over
        sys.stdin.readline()
    totals = [sum(p) for p in zip(*parts.values())]
    result = {"process": jax.process_index(), "seconds_per_step": statistics.median(totals),
              "parts_ms": {name: 1e3 * statistics.median(v) for name, v in parts.items()},
              "step_ms": [1e3 * seconds for seconds in totals],  # each timed step: outliers against a uniform slowdown
              **used.per_step(settings["steps"]),
              "os_threads": len(thread_ids()) or None,
              "boundaries": split.boundaries, "steps": settings["steps"]}
    if P > 1 and settings.get("links"):
        result["links"] = measure_links(trainer, M)
    if jax.process_index() == 0:
        result["provenance"] = {**costs.provenance(), "malloc": "kept freed memory (host_memory.keep_freed_memory)"
                                if kept_memory else "glibc defaults"}
    print(json.dumps(result), flush=True)
    return 0


def measure_links(trainer, microbatches: int) -> dict:
    """Between the processes: a ppermute of one stage message to the next process (rows of the widest
    boundary, one micro-batch; for 2 processes a swap, as one link phase of the FDBP tick) and an
    all-reduce of the largest stage's float32 gradient; median seconds of 20."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from fdbp_jax import perf

    packed, n = trainer.engine.packed, jax.device_count()
    rows = max(1, packed.in_shapes[0].shape[0] // microbatches)
    width = packed.message_width
    params = max(sum(layout.sizes.values()) for layout in packed.param_layouts)
    mesh = jax.make_mesh((n,), ("link",))
    pairs = [(i, (i + 1) % n) for i in range(n)]
    send = jax.jit(jax.shard_map(lambda a: jax.lax.ppermute(a, "link", pairs), mesh=mesh,
                                 in_specs=P("link"), out_specs=P("link")))
    reduce = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, "link"), mesh=mesh, in_specs=P("link"),
                                   out_specs=P("link")))
    sharding = NamedSharding(mesh, P("link"))
    message = jax.make_array_from_callback((n * rows, width), sharding, lambda i: np.ones((rows, width), np.float32))
    gradient = jax.make_array_from_callback((n, params), sharding, lambda i: np.ones((1, params), np.float32))
    return {"message_bytes": rows * width * 4, "ppermute_s": perf.median_seconds(send, message),
            "gradient_bytes": params * 4, "all_reduce_s": perf.median_seconds(reduce, gradient)}


def run_cost_worker(settings: dict) -> int:
    """One worker of the speed model's check: the curves `fdbp_jax.perf` predicts from, measured on this
    one device: the BP step at the global and the per-worker batch, and every stage's tick work (with the
    recompute stash: forward, re-run forward and backward, update; and with each stash that keeps
    residuals) of each split at the batches its engines run. Prints JSON."""
    keep_memory(settings)
    import jax

    jax.config.update("jax_num_cpu_devices", 1)
    from fdbp_jax import costs, models

    blocks = models.model_blocks(settings["model"], split_unit=settings["split_unit"])
    optimizer, shape = costs.default_optimizer(), (32, 32, 3)
    result = {"bp_step": [[b, costs.measure_bp_step(blocks, shape, b, optimizer, settings["repeats"])]
                          for b in settings["bp_batches"]], "splits": {}}
    for boundaries in settings["splits"]:
        split = costs.new_split(boundaries)
        for batch in settings["stage_batches"]:
            costs.measure_split(split, blocks, len(boundaries) + 1, shape, batch, optimizer, settings["repeats"])
        result["splits"][",".join(map(str, boundaries))] = split
    print(json.dumps(result), flush=True)
    return 0


def fitted_link(links: dict):
    """A `perf.Link` through the two measured links: a ppermute of `message_bytes` and a 2-process
    all-reduce of `gradient_bytes` (the model's ring all-reduce: two transfers of half of it)."""
    from fdbp_jax import perf

    m, g, ppermute, reduce = links["message_bytes"], links["gradient_bytes"], links["ppermute_s"], links["all_reduce_s"]
    bandwidth = (m - g / 2) / max(ppermute - reduce / 2, 1e-6)
    return perf.Link(bandwidth=bandwidth, latency=max((reduce - g / bandwidth) / 2, 0.0))


def predicted_seconds(row: dict, measured: dict, link, processes: int, batch: int) -> float | None:
    """What `fdbp_jax.perf` predicts for one benchmark row from one worker's curves and the fitted link;
    None where it has no model (a stash `perf.TICK_CURVES` does not name)."""
    from fdbp_jax import perf
    from fdbp_jax.engines import pipeline_timetable

    if row["algorithm"] == "bp":
        split = next(iter(measured["splits"].values()))
        param_bytes = 4 * sum(s["param_count"] for s in split["stages"])
        return perf.bp_step_time(perf.Curve(tuple(map(tuple, measured["bp_step"]))), param_bytes, batch,
                                 row["workers"], link)
    stash = row["stash"] if row["algorithm"] == "fdbp" else "recompute"  # the pipelines' backwards re-run forwards
    if stash not in perf.TICK_CURVES:
        return None
    split = measured["splits"][",".join(map(str, row["boundaries"]))]
    stages = perf.stage_costs({"splits": {str(processes): split}}, processes, stash=stash)
    if row["algorithm"] == "fdbp":
        return perf.fdbp_tick_time(stages, batch, 1, link)
    timetable = pipeline_timetable(row["algorithm"], processes, row["microbatches"])
    return perf.pipeline_step_time(stages, batch, 1, timetable, link)


def check_model(rows: list[dict], args) -> dict:
    """Measure the curves on one worker (beside a twin on the other core: the machine the rows saw),
    predict every row and put prediction and relative error beside its measurement."""
    links = next(r["links"] for r in rows if "links" in r)  # main() asks for an FDBP row up front
    splits = sorted({tuple(r["boundaries"]) for r in rows if r["algorithm"] != "bp"})
    micro = sorted({r["microbatches"] for r in rows})
    settings = {"name": "costs", "mode": "costs", "model": args.model, "split_unit": args.split_unit, "repeats": 5,
                "system_malloc": args.system_malloc,
                "splits": [list(b) for b in splits],
                "bp_batches": sorted({args.batch, args.batch // args.processes}),
                "stage_batches": sorted({args.batch // m for m in micro})}
    twins = launch(settings, 1, list(range(args.processes)))
    measured = twins[0]  # its twin ran beside it only so that it saw the same machine
    link = fitted_link(links)
    for row in rows:
        predicted = predicted_seconds(row, measured, link, args.processes, args.batch)
        row["predicted_seconds"] = predicted
        row["model_error"] = None if predicted is None else (predicted - row["seconds_per_step"]) / row["seconds_per_step"]
    return {"curves": measured, "twin_curves": twins[1:], "link": {"bandwidth": link.bandwidth, "latency": link.latency}}


def links_config(names: list[str]) -> str | None:
    """The configuration whose row also measures the links (once a round): the first FDBP one, if any."""
    return next((name for name in names if CONFIGS[name][0] == "fdbp"), None)


def config_settings(base: dict, name: str, label: str, microbatches: int, links: bool) -> dict:
    """A worker's settings for the configuration `name` (of CONFIGS), run as `label`."""
    algorithm, _, stash, _ = CONFIGS[name]
    return {**base, "name": label, "algorithm": algorithm, "stash": stash, "microbatches": microbatches, "links": links}


def measure_round(names: list[str], args, base: dict, round_index: int) -> tuple[list[dict], dict | None]:
    """Every configuration of `names` once, each a fresh set of processes: the round's rows (speedups
    against this round's 1-worker baseline) and the provenance of its first row."""
    rows, provenance = [], None
    links_row = links_config(names)
    for name in names:
        algorithm, workers, stash, micro = CONFIGS[name]
        for M in ([1] if micro == 1 else list(map(int, args.microbatches.split(",")))):
            label = name if micro == 1 else f"{name}-M{M}"
            settings = config_settings(base, name, label, M, links=name == links_row)
            twins = None
            if workers == 1:  # the baseline and its twin, side by side, each alone in its process
                results = launch(settings, 1, list(range(args.processes)))
            elif args.lockstep:
                twin = config_settings(base, "bp1", "bp1 (lockstep twin)", 1, links=False)
                results, twins = launch_lockstep(settings, twin, args.processes)
            else:
                results = launch(settings, args.processes, list(range(args.processes)))
            provenance = provenance or results[0].get("provenance")
            seconds = results[0]["seconds_per_step"] if workers != 1 else statistics.mean(
                r["seconds_per_step"] for r in results)
            row = {"name": label, "round": round_index, "algorithm": algorithm, "workers": workers or args.processes,
                   "stash": stash, "microbatches": M, "seconds_per_step": seconds, "images_per_s": args.batch / seconds,
                   "per_process": [{k: r[k] for k in ("seconds_per_step", "step_ms", "parts_ms", "cpu_ms_per_step",
                                                      "kernel_per_step", "thread_cpu_ms_per_step", "os_threads")}
                                   for r in results],
                   "boundaries": results[0]["boundaries"]}
            if "links" in results[0]:
                row["links"] = results[0]["links"]
            if twins is not None:
                row["lockstep"] = lockstep_speedups(results, twins)
            rows.append(row)
            print(f"round {round_index} {label:<18} {1e3 * seconds:8.1f} ms/step {args.batch / seconds:8.1f} images/s"
                  + (f", {row['lockstep']['speedup_median']:.2f}x its lockstep twins" if twins else ""), flush=True)
    baseline = next((r["seconds_per_step"] for r in rows if r["name"] == "bp1"), None)
    for row in rows:
        row["speedup_vs_1_worker"] = None if baseline is None else baseline / row["seconds_per_step"]
    return rows, provenance


def lockstep_speedups(workers: list[dict], twins: list[dict]) -> dict:
    """A lockstep launch's speedup step by step: the mean of the twins' baseline steps (each run right
    after the configuration's step on its core) over the configuration's step (process 0's, as its
    row); their median, and the twins' own timings."""
    alone = [statistics.mean(steps) for steps in zip(*(t["step_ms"] for t in twins))]
    speedups = [a / step for a, step in zip(alone, workers[0]["step_ms"])]
    return {"baseline_seconds": statistics.median(alone) / 1e3, "speedups": speedups,
            "speedup_median": statistics.median(speedups),
            "twins": [{k: t[k] for k in ("seconds_per_step", "step_ms", "cpu_ms_per_step")} for t in twins]}


def over_rounds(rows: list[dict]) -> dict:
    """Per configuration: the median and range over the rounds of its seconds per step and its speedup
    (each against its own round's baseline), and the cuts it ran."""
    summary = {}
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = [r for r in rows if r["name"] == name]
        speedups = [r["speedup_vs_1_worker"] for r in mine if r["speedup_vs_1_worker"] is not None]
        summary[name] = {
            "seconds_per_step": statistics.median(r["seconds_per_step"] for r in mine),
            "speedup_median": statistics.median(speedups) if speedups else None,
            "speedup_range": [min(speedups), max(speedups)] if speedups else None,
            "speedups": speedups, "boundaries": sorted({tuple(r["boundaries"]) for r in mine}),
        }
        lockstep = [r["lockstep"]["speedup_median"] for r in mine if "lockstep" in r]
        if lockstep:
            summary[name]["lockstep_speedup_median"] = statistics.median(lockstep)
            summary[name]["lockstep_speedups"] = lockstep
    return summary


def best_per_round(rows: list[dict], speedup=lambda row: row["speedup_vs_1_worker"]) -> dict:
    """Per algorithm run on every worker: in each round its fastest configuration (FDBP's best stash, the
    pipelines' best M) and that `speedup` (by default against the round's 1-worker launch), then their
    median and range: how a speedup asked "with the best stash, in repeated runs" reads off the rounds."""
    best: dict = {}
    for row in rows:
        if row["workers"] == 1 or speedup(row) is None:
            continue
        per_round = best.setdefault(row["algorithm"], {})
        kept = per_round.get(row["round"])
        if kept is None or speedup(row) > kept["speedup"]:
            per_round[row["round"]] = {"round": row["round"], "name": row["name"], "speedup": speedup(row)}
    summary = {}
    for algorithm, per_round in best.items():
        speedups = [entry["speedup"] for entry in per_round.values()]
        summary[algorithm] = {"rounds": [per_round[r] for r in sorted(per_round)], "median": statistics.median(speedups),
                              "range": [min(speedups), max(speedups)]}
    return summary


def write_json(result: dict, out: str) -> None:
    with open(os.path.join(out, "workers.json"), "w") as f:
        json.dump(result, f, indent=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--microbatches", default="4", help="comma-separated M values for GPipe and 1F1B")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--boundaries", type=lambda v: [int(b) for b in v.split(",")],
                   help="where stages 1..P-1 start (default: split_blocks by --measure)")
    p.add_argument("--measure", default="time", choices=("time", "flops"),
                   help="what the split balances: seconds measured on each worker's device, or FLOPs")
    p.add_argument("--split-unit", default="auto", choices=("auto", "block", "half-block"),
                   help="what the cuts fall between: whole blocks, or halves of ResNet basic blocks (finer cuts; "
                        "auto: halves for the ResNets, whole blocks otherwise)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every configuration this many times, round by round (speedups within each round)")
    p.add_argument("--lockstep", action="store_true",
                   help="run each multi-worker configuration in turn with 1-worker BP twins on the same cores, "
                        "step by step: each step's speedup against the baseline step right after it")
    p.add_argument("--check-model", action="store_true",
                   help="also predict every row with fdbp_jax.perf from curves measured on one worker and the links")
    p.add_argument("--system-malloc", action="store_true",
                   help="leave glibc malloc's defaults in the workers (fdbp_jax.host_memory; fdbp-train's flag too)")
    p.add_argument("--out", default="runs/workers")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        settings = json.loads(args.worker)
        return run_cost_worker(settings) if settings.get("mode") == "costs" else run_worker(settings)
    if args.split_unit == "auto":  # halves where the model has blocks `models.half_blocks` can cut
        from fdbp_jax import models

        halvable = any(isinstance(b, models.BasicBlock) for b in models.model_blocks(args.model))
        args.split_unit = "half-block" if halvable else "block"
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"--configs {','.join(unknown)}: not known; use some of {', '.join(CONFIGS)}")
    if args.processes < 2 or args.batch % (args.processes * max(map(int, args.microbatches.split(",")))):
        p.error("--processes must be >= 2 and --batch divisible by processes x every --microbatches value")
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: give 1 or more")
    if args.check_model and links_config(names) is None:
        p.error("--check-model needs the links, measured in an FDBP row: add fdbp-recompute, fdbp-selective or "
                "fdbp-residuals to --configs")
    os.makedirs(args.out, exist_ok=True)
    base = {"model": args.model, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
            "boundaries": args.boundaries, "measure": args.measure, "split_unit": args.split_unit,
            "system_malloc": args.system_malloc}
    rows, provenance = [], None
    for round_index in range(args.rounds):
        round_rows, round_provenance = measure_round(names, args, base, round_index)
        rows += round_rows
        provenance = provenance or round_provenance
    result = {"provenance": {**(provenance or {}), "processes": args.processes, "model": args.model,
                             "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
                             "boundaries": args.boundaries or f"split_blocks, measure={args.measure}",
                             "split_unit": args.split_unit,
                             "data": "random normal images, fixed seed 0", "pinned": not on_gpu()},
              "rows": rows, "over_rounds": over_rounds(rows), "best_per_round": best_per_round(rows), "model": None}
    if args.lockstep:
        result["best_per_round_lockstep"] = best_per_round(
            rows, lambda row: row["lockstep"]["speedup_median"] if "lockstep" in row else None)
    write_json(result, args.out)  # the measurements are kept whatever the model's check does
    if args.check_model:
        result["model"] = check_model(rows, args)
        write_json(result, args.out)
    for row in rows:
        speedup, predicted = row["speedup_vs_1_worker"], row.get("predicted_seconds")
        print(f"round {row['round']} {row['name']:<18} " + (f"speedup {speedup:.2f}x" if speedup else "")
              + (f"  predicted {1e3 * predicted:7.1f} ms ({100 * row['model_error']:+.0f}%)" if predicted else ""))
    if args.rounds > 1:
        for name, entry in result["over_rounds"].items():
            if entry["speedup_median"] is not None:
                low, high = entry["speedup_range"]
                print(f"{name:<18} speedup median {entry['speedup_median']:.2f}x over {args.rounds} rounds "
                      f"({low:.2f}-{high:.2f}x)")
    for key, against in (("best_per_round", "the round's 1-worker launch"),
                         ("best_per_round_lockstep", "its lockstep twins")):
        for algorithm, entry in result.get(key, {}).items():
            rounds = ", ".join(f"{e['speedup']:.2f}x ({e['name']})" for e in entry["rounds"])
            print(f"{algorithm} at its best against {against}, per round: {rounds}; median {entry['median']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
