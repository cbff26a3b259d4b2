"""The speed model: reading measured curves, and its arithmetic on numbers small enough to check by hand."""

import importlib
import json
import os
import sys

import numpy as np
import pytest

from fdbp_jax import perf
from fdbp_jax.engines import pipeline_timetable

LINK = perf.Link(bandwidth=100.0, latency=1.0)
# two stages, tick work linear at 3 s/example; 10 activation bytes/example; 100 param bytes
STAGES = [perf.StageCost(perf.Curve.linear(3.0), 10.0, 100.0), perf.StageCost(perf.Curve.linear(3.0), 10.0, 100.0)]


def bench_workers():
    """experiments/bench_workers.py as a module (the experiments folder is not a package)."""
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module("bench_workers")


def test_link():
    assert LINK.transfer(0) == 0.0 and LINK.transfer(50) == 1.5
    assert LINK.all_reduce(100, 1) == 0.0
    assert LINK.all_reduce(100, 2) == pytest.approx(2 * 1 * (1 + 50 / 100))  # 2(n-1) steps of 50 bytes


def test_curve_interpolates_floors_and_extends():
    curve = perf.Curve(((32, 4.0), (8, 1.0), (16, 1.0)))  # unsorted on purpose
    assert curve(8) == 1.0 and curve(12) == 1.0 and curve(24) == pytest.approx(2.5)  # linear between points
    assert curve(2) == 1.0  # below the smallest batch: its time (launch-bound floor)
    assert curve(64) == pytest.approx(8.0)  # above the largest: at the largest point's rate
    assert perf.Curve.linear(0.5)(10) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="at least one"):
        perf.Curve(())


def test_fdbp_tick_is_the_slowest_stage():
    # batch 4, N = 2: 2 examples per replica, 6 s of work. Stage 0 sends 20 bytes (1.2 s), all-reduce of
    # 100 bytes over 2 replicas: 3 s -> 10.2 s. Stage 1 receives 20 bytes: the same.
    assert perf.fdbp_tick_time(STAGES, 4, 2, LINK) == pytest.approx(10.2)
    slow = [STAGES[0], perf.StageCost(perf.Curve.linear(5.0), 10.0, 100.0)]
    assert perf.fdbp_tick_time(slow, 4, 2, LINK) == pytest.approx(10 + 1.2 + 3)


def test_bp_step():
    # 4 devices, 1 example each: 6 s; all-reduce of 200 bytes over 4: 6 steps of (1 + 0.5) s = 9 s
    assert perf.bp_step_time(perf.Curve.linear(6.0), 200.0, 4, 4, LINK) == pytest.approx(15.0)


def test_launch_bound_devices_favour_the_pipeline():
    # every piece of work costs 1 s whatever its batch (fully launch-bound): BP on 8 devices still pays a
    # whole step, FDBP's stages each pay one tick of their own; with a free link both take 1 s per batch,
    # with a 1 s all-reduce per step BP pays 2(8-1) of them against 2(2-1) for a stage over N=2 replicas
    flat = perf.Curve(((1, 1.0), (1024, 1.0)))
    stages = [perf.StageCost(flat, 0.0, 100.0) for _ in range(4)]
    free = perf.Link(float("inf"), 0.0)
    assert perf.bp_step_time(flat, 400.0, 128, 8, free) == perf.fdbp_tick_time(stages, 128, 2, free) == 1.0
    slow_link = perf.Link(float("inf"), 1.0)
    assert perf.bp_step_time(flat, 400.0, 128, 8, slow_link) == pytest.approx(1 + 14)
    assert perf.fdbp_tick_time(stages, 128, 2, slow_link) == pytest.approx(1 + 2)


def test_pipeline_step_follows_its_timetable_tick_by_tick():
    # K = 2, batch 8, N = 2, M = 2: micro-batches of 2 examples. Stage 0: forward 1 s/example (2 s),
    # tick work 4 s/example (8 s) of which 1 s update, so its backward (forward again + backward) is
    # 8 - 2 - 1 = 5 s; the last stage's backward (forward and backward at once): 7 s. 20 bytes go each way
    # (1.2 s a tick). 1F1B's timetable: F0 | F1, B0' | B0, B1' | B1 (B' the last stage's); GPipe's:
    # F0 | F1, F0' | F1' | B0' | B0, B1' | B1, its last stage's forwards empty.
    work, forward = perf.Curve.linear(4.0), perf.Curve.linear(1.0)
    stages = [perf.StageCost(work, 10.0, 100.0, update=1.0, forward=forward),
              perf.StageCost(perf.Curve.linear(4.0), 10.0, 100.0, update=1.0, forward=forward)]
    finish = 1 + LINK.all_reduce(100.0, 2)  # one update, one all-reduce of the gradient
    one_f_one_b, gpipe = (pipeline_timetable(a, 2, 2) for a in ("1f1b", "gpipe"))
    assert one_f_one_b.ticks == 4 and gpipe.ticks == 6
    assert perf.pipeline_step_time(stages, 8, 2, one_f_one_b, LINK) == pytest.approx(2 + 7 + 7 + 5 + 4 * 1.2 + finish)
    assert perf.pipeline_step_time(stages, 8, 2, gpipe, LINK) == pytest.approx(2 + 2 + 0 + 7 + 7 + 5 + 6 * 1.2 + finish)
    with pytest.raises(ValueError, match="forward curve"):
        perf.pipeline_step_time(STAGES, 8, 2, gpipe, LINK)
    with pytest.raises(ValueError, match="K=4 stages but 2"):
        perf.pipeline_step_time(stages, 8, 2, pipeline_timetable("gpipe", 4, 2), LINK)
    with pytest.raises(ValueError, match="'fdbp' has no timetable: the synchronous pipelines are 1f1b, gpipe"):
        pipeline_timetable("fdbp", 2, 2)


def test_shared_cores():
    # 2 cores, N = 2, stage work 6 s per replica: (2 * 12) / 2 = 12 s > slowest stage 6 s
    assert perf.shared_cores_tick_time(STAGES, 4, 2, cores=2) == pytest.approx(12.0)
    assert perf.shared_cores_tick_time(STAGES, 4, 2, cores=64) == pytest.approx(6.0)


MEASURED = {
    "model": "toy",
    "bp_step": [[8, 0.5], [16, 0.75]],
    "splits": {"2": {"boundaries": [1], "stages": [
        {"forward": [[8, 0.1]], "tick": [[8, 0.25], [16, 0.5]], "tick_selective": [[8, 0.2], [16, 0.4]],
         "tick_residuals": [[8, 0.3], [16, 0.6]], "update_s": 0.01, "activation_elements": 6, "param_count": 10},
        {"forward": [[8, 0.1]], "tick": [[8, 0.125], [16, 0.25]], "tick_selective": [[8, 0.125], [16, 0.25]],
         "tick_residuals": [[8, 0.125], [16, 0.25]], "update_s": 0.01, "activation_elements": 2, "param_count": 30},
    ]}},
}


def test_reading_a_measurement(tmp_path):
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(MEASURED))
    measured = perf.load_costs(str(path))
    stages = perf.stage_costs(measured, 2)
    assert [s.work(12) for s in stages] == pytest.approx([0.375, 0.1875])
    assert [s.activation_bytes for s in stages] == [24, 8] and [s.param_bytes for s in stages] == [40, 120]
    step, param_bytes = perf.bp_costs(measured)
    assert step(12) == pytest.approx(0.625) and param_bytes == 160
    with pytest.raises(ValueError, match="K=4"):
        perf.stage_costs(measured, 4)
    assert [s.work(12) for s in perf.stage_costs(measured, 2, stash="selective")] == pytest.approx([0.3, 0.1875])
    assert [s.work(12) for s in perf.stage_costs(measured, 2, stash="residuals")] == pytest.approx([0.45, 0.1875])
    with pytest.raises(ValueError, match="stash='auto' has no measured tick curve"):
        perf.stage_costs(measured, 2, stash="auto")
    older = json.loads(json.dumps(MEASURED))
    for stage in older["splits"]["2"]["stages"]:
        del stage["tick_residuals"]
    assert [s.work(12) for s in perf.stage_costs(older, 2, stash="selective")] == pytest.approx([0.3, 0.1875])
    with pytest.raises(ValueError, match="tick_residuals.*measure it again"):
        perf.stage_costs(older, 2, stash="residuals")


def test_ticks_to_accuracy():
    evals = [{"tick": 20, "test_accuracy": 0.7}, {"tick": 10, "test_accuracy": 0.5}, {"tick": 30, "test_accuracy": 0.8}]
    assert perf.ticks_to_accuracy(evals, 0.6) == 20
    assert perf.ticks_to_accuracy(evals, 0.8) == 30
    assert perf.ticks_to_accuracy(evals, 0.9) is None


def test_link_fitted_to_the_measured_links_reproduces_them():
    """experiments/bench_workers.py's model check fits a Link through a measured ppermute and a 2-process
    all-reduce; the speed model must then predict both measurements back."""
    fitted_link = bench_workers().fitted_link

    links = {"message_bytes": 8388608, "ppermute_s": 0.00495, "gradient_bytes": 1039656, "all_reduce_s": 0.0040}
    link = fitted_link(links)
    assert link.latency > 0 and link.bandwidth > 0
    np.testing.assert_allclose(link.transfer(links["message_bytes"]), links["ppermute_s"], rtol=1e-9)
    np.testing.assert_allclose(link.all_reduce(links["gradient_bytes"], 2), links["all_reduce_s"], rtol=1e-9)


def test_bench_workers_gives_each_round_its_own_baseline():
    """With --rounds, a row's speedup is against the 1-worker baseline of its own round (the machine may
    drift between rounds), then the median and range over the rounds."""
    over_rounds = bench_workers().over_rounds

    rows = [{"name": name, "round": r, "seconds_per_step": s, "speedup_vs_1_worker": speedup, "boundaries": cut}
            for name, r, s, speedup, cut in [("bp1", 0, 1.0, 1.0, []), ("fdbp", 0, 0.5, 2.0, [7]),
                                             ("bp1", 1, 2.0, 1.0, []), ("fdbp", 1, 1.25, 1.6, [6]),
                                             ("bp1", 2, 1.5, 1.0, []), ("fdbp", 2, 0.8, 1.875, [7])]]
    summary = over_rounds(rows)
    assert summary["fdbp"]["speedup_median"] == pytest.approx(1.875) and summary["fdbp"]["speedup_range"] == [1.6, 2.0]
    assert summary["fdbp"]["seconds_per_step"] == pytest.approx(0.8) and summary["fdbp"]["boundaries"] == [(6,), (7,)]
    assert summary["bp1"]["speedups"] == [1.0, 1.0, 1.0]


def test_bench_workers_refuses_a_model_check_without_an_fdbp_row_before_measuring(tmp_path, capsys):
    """--check-model fits the link to what an FDBP row measures: without one it stops at once, with one
    line naming the fix, not after the rows were measured (a run of 18 minutes was lost so)."""
    with pytest.raises(SystemExit) as stop:
        bench_workers().main(["--configs", "bp1,bp", "--check-model", "--out", str(tmp_path / "w")])
    assert stop.value.code == 2
    assert "add fdbp-recompute, fdbp-selective or fdbp-residuals to --configs" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "w")  # nothing was launched or written


def test_bench_workers_reads_each_algorithms_best_configuration_per_round():
    """FDBP "with the best stash" is, in each round, its fastest stash against that round's baseline;
    the 1-worker rows are not an algorithm's configuration."""
    best_per_round = bench_workers().best_per_round

    rows = [{"name": name, "algorithm": name.split("-")[0], "workers": 1 if name == "bp1" else 2, "round": r,
             "speedup_vs_1_worker": speedup}
            for name, r, speedup in [("bp1", 0, 1.0), ("bp", 0, 1.9), ("fdbp-recompute", 0, 1.57),
                                     ("fdbp-selective", 0, 1.63), ("bp1", 1, 1.0), ("bp", 1, 2.0),
                                     ("fdbp-recompute", 1, 1.72), ("fdbp-selective", 1, 1.71),
                                     ("bp1", 2, 1.0), ("bp", 2, 1.95), ("fdbp-recompute", 2, 1.73),
                                     ("fdbp-selective", 2, 1.77)]]
    best = best_per_round(rows)
    assert set(best) == {"bp", "fdbp"}
    assert [(e["round"], e["name"]) for e in best["fdbp"]["rounds"]] == [
        (0, "fdbp-selective"), (1, "fdbp-recompute"), (2, "fdbp-selective")]
    assert best["fdbp"]["median"] == pytest.approx(1.72) and best["fdbp"]["range"] == [1.63, 1.77]
    assert best["bp"]["median"] == pytest.approx(1.95)


FAKE_WORKER = """
import glob, json, os, sys, time
settings = json.loads(sys.argv[1])
who = f"{settings['name']} {os.getpid()}"
print("[Gloo] a runtime's own line on stdout", flush=True)
print("ready", flush=True)
steps = []
for _ in range(settings["warmup"] + settings["steps"]):
    sys.stdin.readline()
    start = time.monotonic()
    time.sleep(0.02)
    steps.append((start, time.monotonic()))
    print("stepped", flush=True)
sys.stdin.readline()  # released by the driver
steps.append((time.monotonic(), time.monotonic()))
open(f"{settings['log']}.{settings['name']}.{os.getpid()}", "w").close()  # as jax.distributed's shutdown,
deadline = time.monotonic() + 20  # wait until every process of the group is released
while len(glob.glob(f"{settings['log']}.{settings['name']}.*")) < 2:
    if time.monotonic() > deadline:
        sys.exit("the other process of the group was never released")
    time.sleep(0.01)
with open(settings["log"], "a") as log:
    log.writelines(f"{who} {a} {b}\\n" for a, b in steps)
print(json.dumps({"step_ms": [1e3 * (b - a) for a, b in steps[:-1]], "seconds_per_step": 0.02, "cpu_ms_per_step": 0.0}))
"""


def test_lockstep_runs_each_configuration_step_and_its_twins_step_in_turn(tmp_path, monkeypatch):
    """--lockstep drives real processes: the configuration's workers start first, then the twins, and
    each step of every worker ends before the twins' step starts, which ends before the next step; the
    workers go on (to their links, their exit) only after the twins' last step, all of them together
    (each waits at exit for the others, as in jax.distributed's shutdown); lines a runtime prints (gloo's)
    are passed over; each step's speedup is the twins' mean over it."""
    module = bench_workers()
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    monkeypatch.setattr(module, "worker_process", lambda command, worker: (
        [sys.executable, str(script), command[-1]], dict(os.environ)))
    log = str(tmp_path / "steps.log")
    settings = {"name": "fdbp", "warmup": 1, "steps": 2, "log": log}
    workers, twins = module.launch_lockstep(settings, {**settings, "name": "bp1"}, processes=2)
    assert len(workers) == len(twins) == 2 and all(len(r["step_ms"]) == 3 for r in workers + twins)
    steps: dict[str, dict[str, list]] = {}  # name -> process -> its (start, end) of each step, then its release
    for line in open(log):
        name, pid, start, end = line.split()
        steps.setdefault(name, {}).setdefault(pid, []).append((float(start), float(end)))
    assert [len(processes) for processes in steps.values()] == [2, 2]
    for step in range(3):
        worker_steps = [mine[step] for mine in steps["fdbp"].values()]
        twin_steps = [mine[step] for mine in steps["bp1"].values()]
        assert max(end for _, end in worker_steps) <= min(start for start, _ in twin_steps)
        # the workers' next step, or after the last one their release (to measure the links and exit)
        assert max(end for _, end in twin_steps) <= min(mine[step + 1][0] for mine in steps["fdbp"].values())

    speedups = module.lockstep_speedups([{"step_ms": [400.0, 350.0, 360.0]}, {"step_ms": [401.0, 351.0, 361.0]}],
                                        [{"step_ms": [700.0, 640.0, 720.0], "seconds_per_step": 0.7, "cpu_ms_per_step": 1},
                                         {"step_ms": [740.0, 660.0, 720.0], "seconds_per_step": 0.7, "cpu_ms_per_step": 1}])
    assert speedups["speedups"] == pytest.approx([1.8, 650 / 350, 2.0])
    assert speedups["speedup_median"] == pytest.approx(650 / 350) and speedups["baseline_seconds"] == pytest.approx(0.72)


def test_a_lockstep_worker_that_dies_stops_the_run_with_its_error(tmp_path, monkeypatch):
    """A worker that ends before its turn is answered makes the driver raise with the end of its stderr,
    not wait for a line that never comes."""
    module = bench_workers()
    script = tmp_path / "dying_worker.py"
    script.write_text("import sys\nprint('ready', flush=True)\nsys.stdin.readline()\n"
                      "sys.exit('worker lost its device')\n")
    monkeypatch.setattr(module, "worker_process", lambda command, worker: (
        [sys.executable, str(script), command[-1]], dict(os.environ)))
    settings = {"name": "fdbp", "warmup": 0, "steps": 1}
    with pytest.raises(RuntimeError, match="a worker of fdbp failed .*worker lost its device"):
        module.launch_lockstep(settings, {**settings, "name": "bp1"}, processes=2)


def test_interleaved_timing_runs_every_configuration_in_turn_round_by_round():
    """`perf.time_interleaved`: after each run's first call and warm-up, `rounds` rounds in which every run
    takes `steps` steps in turn, each run's state threaded through all of its own calls."""
    calls = []

    class Counting:
        def __init__(self, name):
            self.name = name

        def step(self, state, x, y):
            calls.append(self.name)
            return state + 1, {}

    timed = perf.time_interleaved({"a": (Counting("a"), np.int32(0)), "b": (Counting("b"), np.int32(10))},
                                  None, None, steps=2, rounds=3, warmup=1)
    assert calls == ["a"] * 2 + ["b"] * 2 + ["a", "a", "b", "b"] * 3
    assert {label: int(state) for label, (_, _, state) in timed.items()} == {"a": 8, "b": 18}
    assert all(first >= 0 and median >= 0 for first, median, _ in timed.values())
    calls.clear()  # `time_steps` is one such run
    assert int(perf.time_steps(Counting("c"), np.int32(0), None, None, steps=3, warmup=2)[2]) == 6
    assert calls == ["c"] * 6


def test_provenance_names_the_commit_measured():
    """Every benchmark's provenance (`costs.provenance`) says which code ran: the checkout's HEAD, marked
    "+changes" exactly when its tracked files differ from it."""
    import subprocess

    from fdbp_jax import costs

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, ".git")):
        pytest.skip("not a git checkout: provenance's commit is None there")
    git = lambda *args: subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, check=True).stdout
    head, changed = git("rev-parse", "HEAD").strip(), bool(git("status", "--porcelain", "--untracked-files=no").strip())
    assert costs.provenance()["commit"] == head + ("+changes" if changed else "")


@pytest.mark.parametrize("stash", ["selective", "residuals"])
def test_the_stashing_tick_that_costs_times_computes_the_exact_delayed_gradient(stash):
    """`costs` times the tick of each stash that keeps residuals as the mesh runs it: a new forward, and
    the pullback of the residuals an old batch's forward kept, which are that forward's exact gradients."""
    import flax.linen as nn
    import jax
    import optax

    from fdbp_jax import costs
    from fdbp_jax.stages import Stage, delayed_grads, split_variables

    class ConvBlock(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = True):
            return nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x)))

    stage = Stage(ConvBlock())
    rng = np.random.default_rng(0)
    h_new, h_old, g = (rng.normal(size=(2, 6, 6, c)).astype(np.float32) for c in (3, 3, 4))
    params, model_state = split_variables(stage.init(jax.random.key(0), h_new))
    optimizer = optax.sgd(0.1)
    assert stash in costs.RESIDUAL_STASHES
    tick, args = costs.stashing_tick(stage, 1, stash, model_state, optimizer,
                                     (params, optimizer.init(params), h_new, h_old, g))
    y, residuals, (d_input,), new_params, _ = jax.jit(tick)(*args)
    d_params, expected_input, _ = delayed_grads(stage, params, model_state, h_old, g, input_grad=True)
    np.testing.assert_allclose(y, stage.apply(params, model_state, h_new, train=True)[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d_input, expected_input, rtol=1e-5, atol=1e-6)
    expected_params = jax.tree.map(lambda p, d: p - 0.1 * d, params, d_params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new_params, expected_params)
    assert len(residuals) == len(args[3])  # the new forward keeps what the old one kept


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads Linux's /proc/self/task")
def test_bench_workers_charges_cpu_time_to_the_thread_that_used_it():
    """The per-thread CPU breakdown of a worker's step (which threads take a pinned worker's core): a
    thread that computes has that CPU time under its own name, one that waits has none."""
    import ctypes
    import threading
    import time

    thread_cpu = bench_workers().thread_cpu

    spun, release = threading.Event(), threading.Event()

    def named(name: bytes, work):
        ctypes.CDLL(None).prctl(15, name, 0, 0, 0)  # PR_SET_NAME: the name /proc shows for this thread
        work()
        release.wait()

    def spin():
        deadline = time.thread_time() + 0.3
        while time.thread_time() < deadline:
            pass
        spun.set()

    threads = [threading.Thread(target=named, args=(b"fdbp-spin", spin)),
               threading.Thread(target=named, args=(b"fdbp-wait", lambda: None))]
    for thread in threads:
        thread.start()
    spun.wait()
    seconds = thread_cpu()
    release.set()
    for thread in threads:
        thread.join()
    assert seconds["fdbp-spin"] >= 0.25
    assert seconds["fdbp-wait"] < 0.05


def test_stage_curves_time_each_stash_tick_as_the_mesh_runs_it():
    """`costs.measure_split` times every stage's tick with each stash (the residual stashes through
    `partition.stash_tick`, shared with the split's costs); the last stage stashes nothing, so its ticks
    are one measurement. A half-block boundary is a pytree ({"h", "skip"}) that the ticks must carry."""
    from fdbp_jax import costs, models

    split = costs.new_split([6, 13])  # stage 1 starts and ends inside a block
    costs.measure_split(split, models.model_blocks("resnet20", split_unit="half-block"), 3, (32, 32, 3), 2,
                        costs.default_optimizer(), repeats=1)
    curves = [[stage[curve] for curve in perf.TICK_CURVES.values()] for stage in split["stages"]]
    assert all(len(c) == 1 and c[0][0] == 2 and c[0][1] > 0 for stage in curves for c in stage)
    assert curves[-1][0] == curves[-1][1] == curves[-1][2]
