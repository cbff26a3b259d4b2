"""`fdbp-train` and `train_and_evaluate` as real processes under jax.distributed (one CPU device each):
the metrics of a P-process run equal the one-process run on the same devices, whatever process
starts first; a bad setting is refused by every process; a killed peer ends the others with one line
and exit code 4, and --resume on all ends bit-exactly where an uninterrupted run ends; a signal to one
process stops all at the same tick with one checkpoint."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_data import cifar10_binary

from fdbp_jax import cli
from fdbp_jax import data as data_lib
from fdbp_jax import train
from fdbp_jax.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICKS_PER_EPOCH, EPOCHS, EVAL_EXAMPLES = 16, 2, 40
FLAGS = ["--model", "cnn", "--stages", "2", "--batch-size", "16", "--lr", "0.05", "--schedule", "constant",
         "--epochs", str(EPOCHS), "--train-examples", str(16 * TICKS_PER_EPOCH), "--eval-examples",
         str(EVAL_EXAMPLES), "--eval-batch-size", "16", "--log-every", "2", "--no-progress", "--no-tensorboard"]
LOST_PEER_BOUND_S = 120  # what docs/multihost.md promises for a survivor to exit on this machine

pytestmark = pytest.mark.skipif(not hasattr(jax.config, "jax_cpu_collectives_implementation"),
                                reason="this jaxlib has no CPU collectives across processes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A tiny CIFAR-10 prepared by TFDS's own builder (400 train, 40 test images), read by every process."""
    import tensorflow_datasets as tfds
    from unittest import mock

    folder = tmp_path_factory.mktemp("tfds")
    archive = cifar10_binary(folder / "download", per_batch=80, test=EVAL_EXAMPLES)
    with mock.patch.object(data_lib, "reachable", lambda host: None), \
            mock.patch.object(tfds.download.DownloadManager, "download_and_extract", lambda self, url: archive):
        data_lib.load_tfds("cifar10", "train", data_dir=str(folder / "prepared"))
        data_lib.load_tfds("cifar10", "test", data_dir=str(folder / "prepared"))
    return str(folder / "prepared")


def start(processes: int, command, tfds_dir: str, first: int | None = None) -> list[subprocess.Popen]:
    """`processes` real processes of `command(process_id, port)`, one CPU device each; `first` starts
    alone a second before the others (every start order must work)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "TFDS_DATA_DIR": tfds_dir}
    order = sorted(range(processes), key=lambda i: i != first)
    procs = {}
    for n, i in enumerate(order):
        procs[i] = subprocess.Popen(command(i, port), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if n == 0 and first is not None:
            time.sleep(1.0)
    return [procs[i] for i in range(processes)]


def finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each process; all are killed if any outlives `timeout`."""
    results, deadline = [], time.time() + timeout
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"a process was still running after {timeout} s (a hang)")
        results.append((proc.returncode, out, err))
    return results


def cli_command(workdir, processes: int, *extra: str):
    return lambda i, port: [sys.executable, "-m", "fdbp_jax.cli", *FLAGS, "--data-parallel", str(processes // 2),
                            "--workdir", str(workdir), "--num-processes", str(processes), "--process-id", str(i),
                            "--coordinator-address", f"127.0.0.1:{port}", *extra]


def history(workdir) -> list[dict]:
    return json.load(open(os.path.join(workdir, "summary.json")))["history"]


def assert_same_metrics(got: list[dict], expected: list[dict]) -> None:
    """Epoch by epoch: accuracy and train loss as the one-process run (within float summation order:
    one process with two devices and two processes with one each add in different orders)."""
    assert [h["epoch"] for h in got] == [h["epoch"] for h in expected] and [h["tick"] for h in got] == \
        [h["tick"] for h in expected]
    for g, e in zip(got, expected):
        assert abs(g["test_accuracy"] - e["test_accuracy"]) <= 1 / EVAL_EXAMPLES, (g, e)  # at most one example
        assert g["train_loss"] == pytest.approx(e["train_loss"], rel=1e-4)


def final_arrays(workdir) -> list[np.ndarray]:
    """Every array of the run's newest checkpoint, read back on the host."""
    checkpoints = os.path.join(workdir, "checkpoints")
    path = os.path.join(checkpoints, max(os.listdir(checkpoints), key=int), "state")
    reader = ocp.PyTreeCheckpointer()
    tree = reader.metadata(path).item_metadata.tree
    return jax.tree.leaves(reader.restore(path, restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)))


@pytest.fixture(scope="module")
def one_process(tfds_dir, tmp_path_factory):
    """The reference: fdbp-train in this process on 2 of its devices (data 1, stage 2)."""
    workdir = tmp_path_factory.mktemp("one") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TFDS_DATA_DIR", tfds_dir)
        assert cli.main(FLAGS + ["--data-parallel", "1", "--workdir", str(workdir)]) == 0
    return workdir


@pytest.fixture(scope="module")
def two_processes(tfds_dir, tmp_path_factory):
    """fdbp-train on 2 processes x 1 device (the stage axis across them), process 1 started first."""
    workdir = tmp_path_factory.mktemp("two") / "run"
    results = finish(start(2, cli_command(workdir, 2), tfds_dir, first=1))
    assert all(code == 0 for code, _, _ in results), [err[-2000:] for _, _, err in results]
    return workdir, results


def test_two_processes_report_the_metrics_of_one(one_process, two_processes):
    workdir, results = two_processes
    assert_same_metrics(history(workdir), history(one_process))
    summary, reference = (json.load(open(os.path.join(w, "summary.json"))) for w in (workdir, one_process))
    assert summary["skipped_updates"] == reference["skipped_updates"] == 0
    assert summary["ticks_per_epoch"] == reference["ticks_per_epoch"] == TICKS_PER_EPOCH
    printed = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results]
    assert printed[0]["test_accuracy"] == printed[1]["test_accuracy"] == summary["test_accuracy"]
    events = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]  # process 0 alone writes
    assert [e["tick"] for e in events if e["event"] == "train"] == list(range(2, EPOCHS * TICKS_PER_EPOCH + 1, 2))


RUNNER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 1)
    from fdbp_jax import distributed
    distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=4, process_id=int(sys.argv[2]))
    from fdbp_jax import train
    from fdbp_jax.config import Config
    config = Config(**json.loads(sys.argv[3]))
    result = train.train_and_evaluate(config, sys.argv[4], show_progress=False)
    print(json.dumps(result.summary["history"]), flush=True)
""")

API_SETTINGS = dict(model="cnn", stages=2, data_parallel=2, batch_size=16, lr=0.05, schedule="constant", epochs=2,
                    train_examples=16 * 8, eval_examples=EVAL_EXAMPLES, eval_batch_size=16, log_every=4,
                    tensorboard=False)


def test_four_processes_with_data_and_stage_axes_across_them_report_the_metrics_of_one(tfds_dir, tmp_path):
    """train_and_evaluate on 4 processes x 1 device, mesh (data 2, stage 2), process 3 started first."""
    config = Config(**API_SETTINGS)
    command = lambda i, port: [sys.executable, "-c", RUNNER, str(port), str(i), json.dumps(config.to_json()),
                               str(tmp_path / "four")]
    results = finish(start(4, command, tfds_dir, first=3))
    assert all(code == 0 for code, _, _ in results), [err[-2000:] for _, _, err in results]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TFDS_DATA_DIR", tfds_dir)
        expected = train.train_and_evaluate(config, str(tmp_path / "one"), show_progress=False).summary["history"]
    for _, out, _ in results:  # every process returns the same history
        assert_same_metrics(json.loads(out.strip().splitlines()[-1]), expected)


def test_a_refused_setting_is_the_same_line_and_exit_code_2_on_every_process(tfds_dir, tmp_path):
    """The workdir holds a run: process 0 alone checks it, and every process refuses with its line."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "summary.json").write_text('{"run": "earlier"}')
    results = finish(start(2, cli_command(workdir, 2), tfds_dir, first=1))
    lines = [err.strip().splitlines()[-1] for _, _, err in results]
    assert [code for code, _, _ in results] == [2, 2] and lines[0] == lines[1], lines
    assert lines[0].startswith("fdbp-train: error: --workdir") and "already holds a run (summary.json)" in lines[0]
    assert (workdir / "summary.json").read_text() == '{"run": "earlier"}' and sorted(os.listdir(workdir)) == ["summary.json"]


def test_processes_started_with_different_settings_are_refused(tfds_dir, tmp_path):
    base = cli_command(tmp_path / "run", 2)
    command = lambda i, port: base(i, port) + (["--lr", "0.1"] if i == 1 else [])
    results = finish(start(2, command, tfds_dir))
    lines = [err.strip().splitlines()[-1] for _, _, err in results]
    assert [code for code, _, _ in results] == [2, 2] and lines[0] == lines[1], lines
    assert "process 1 was started with other settings than process 0" in lines[0]


def wait_for_train_tick(workdir, tick: int, procs, timeout: float = 180) -> None:
    """Block until metrics.jsonl records a train event at `tick` or later (mid-epoch, past a checkpoint)."""
    deadline, metrics = time.time() + timeout, os.path.join(workdir, "metrics.jsonl")
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if os.path.exists(metrics):
            ticks = [json.loads(line)["tick"] for line in open(metrics) if '"train"' in line and line.endswith("\n")]
            if ticks and ticks[-1] >= tick:
                return
        time.sleep(0.02)
    pytest.fail(f"no train event at tick {tick} in {metrics}")


def resume_and_compare(workdir, uninterrupted, tfds_dir) -> None:
    results = finish(start(2, cli_command(workdir, 2, "--resume"), tfds_dir))
    assert all(code == 0 for code, _, _ in results), [err[-2000:] for _, _, err in results]
    assert [h["epoch"] for h in history(workdir)] == list(range(1, EPOCHS + 1))
    expected, got = final_arrays(uninterrupted), final_arrays(workdir)
    assert len(expected) == len(got) > 0
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(e, g)  # bit-exact


def test_a_killed_process_ends_the_others_with_one_line_and_resume_ends_where_an_uninterrupted_run_does(
        tfds_dir, two_processes, tmp_path):
    workdir = tmp_path / "run"
    procs = start(2, cli_command(workdir, 2), tfds_dir)
    wait_for_train_tick(workdir, TICKS_PER_EPOCH + 4, procs)  # epoch 2, its checkpoint written
    procs[1].kill()
    killed_at = time.time()
    code, _, err = finish(procs[:1], timeout=LOST_PEER_BOUND_S)[0]
    assert time.time() - killed_at < LOST_PEER_BOUND_S
    finish(procs[1:])
    line = err.strip().splitlines()[-1]
    assert code == cli.EXIT_LOST_PROCESS and "Traceback" not in err, err[-3000:]
    assert line.startswith("fdbp-train: error: [process 0] a collective with the other 1 process(es) failed")
    assert f"checkpoints are intact (latest: tick {TICKS_PER_EPOCH})" in line and line.endswith("--resume")
    resume_and_compare(workdir, two_processes[0], tfds_dir)


def test_a_signal_to_one_process_stops_every_process_at_the_same_tick(tfds_dir, two_processes, tmp_path):
    workdir = tmp_path / "run"
    procs = start(2, cli_command(workdir, 2), tfds_dir)
    wait_for_train_tick(workdir, TICKS_PER_EPOCH + 2, procs)
    procs[1].send_signal(signal.SIGTERM)
    results = finish(procs)
    assert [code for code, _, _ in results] == [cli.EXIT_INTERRUPTED] * 2, [err[-2000:] for _, _, err in results]
    stops = [err.strip().splitlines()[-1].split("; checkpoint written")[0] for _, _, err in results]
    assert stops[0] == stops[1] and stops[0].startswith("fdbp-train: stopped by signal at epoch 2, tick ")
    index = int(stops[0].rsplit("tick ", 1)[1].split()[0])
    assert sorted(map(int, os.listdir(workdir / "checkpoints"))) == [TICKS_PER_EPOCH, TICKS_PER_EPOCH + index]
    resume_and_compare(workdir, two_processes[0], tfds_dir)
