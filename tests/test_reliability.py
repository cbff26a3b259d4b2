"""Bad input -> one clear line and exit code 2 with nothing overwritten; divergence -> exit code 3;
non-finite updates can be skipped; SIGTERM and SIGKILL lose nothing on resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import optax
import pytest
import toy

import fdbp_jax as fj
from fdbp_jax import data as data_lib
from fdbp_jax import checkpoint, cli, train
from fdbp_jax.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--model", "cnn", "--stages", "2", "--data-parallel", "2", "--batch-size", "16", "--no-progress"]

# (flags, what the one-line message must say)
BAD_INPUT = [
    (["--model", "vgg"], "--model vgg: unknown; valid: resnet20, resnet32, resnet44, resnet56, resnet110, wrn28_10, cnn"),
    (["--dataset", "mnist"], "--dataset mnist: unknown; valid: cifar10"),
    (["--schedule", "linear"], "--schedule linear: unknown; valid: constant, step, cosine"),
    (["--algorithm", "sgd"], "--algorithm sgd: unknown; valid: fdbp, bp, gpipe, 1f1b"),
    (["--correction", "guess"], "--correction guess: unknown; valid: none, predict, lookahead"),
    (["--algorithm", "bp", "--correction", "predict"], "--correction predict: corrects FDBP's stale gradients, not "
                                                       "--algorithm bp; use --correction none"),
    (["--split-unit", "layer"], "--split-unit layer: unknown; valid: block, half-block"),
    (["--split-unit", "half-block"], "--split-unit half-block with --model cnn: these blocks have no residual block "
                                     "to cut in half (only the ResNets' basic blocks can be): use the whole blocks "
                                     "(--split-unit block)"),
    (["--microbatches", "2"], "--microbatches 2: only the synchronous pipelines (--algorithm gpipe or 1f1b) split"),
    (["--algorithm", "gpipe", "--microbatches", "0"], "--microbatches 0: must be >= 1"),
    (["--algorithm", "1f1b", "--microbatches", "3"], "--batch-size 16: must be a multiple of --data-parallel 2 x "
                                                      "--microbatches 3 = 6"),
    (["--stages", "0"], "--stages 0: must be between 1 and 6 (the blocks of cnn)"),
    (["--stages", "7"], "--stages 7: must be between 1 and 6 (the blocks of cnn)"),
    (["--data-parallel", "0"], "--data-parallel 0: must be >= 1"),
    (["--stages", "4", "--data-parallel", "4"], "data=4 x stage=4 needs 16 devices but only 8 cpu device(s) are available"),
    (["--batch-size", "15"], "--batch-size 15: must be a positive multiple of --data-parallel 2"),
    (["--batch-size", "1"], "--batch-size 1: must be a positive multiple of --data-parallel 2"),
    (["--shrink", "0"], "--shrink 0.0: must be in (0, 1]"),
    (["--shrink", "1.5"], "--shrink 1.5: must be in (0, 1]"),
    (["--lr", "0"], "--lr 0.0: must be > 0"),
    (["--lr", "-0.1"], "--lr -0.1: must be > 0"),
    (["--epochs", "-1"], "--epochs -1: must be >= 0"),
    (["--train-examples", "-5"], "--train-examples -5: must be >= 1"),
    (["--eval-examples", "0"], "--eval-examples 0: must be >= 1"),
    (["--boundaries", "3,1"], "--boundaries needs K-1 = 1 values for K=2, got 2"),
    (["--stages", "3", "--boundaries", "3,2"], "--boundaries 3,2 must be strictly increasing block indices between 1 and 5"),
    (["--log-every", "0"], "--log-every 0: must be >= 1"),
    (["--eval-batch-size", "0"], "--eval-batch-size 0: must be >= 1"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints 0: must be >= 1"),
    (["--momentum", "1"], "--momentum 1.0: must be in [0, 1)"),
    (["--seed", "-1"], "--seed -1: must be >= 0"),
    (["--epochs", "2", "--warmup-epochs", "3"], "--warmup-epochs 3.0: longer than --epochs 2"),
    (["--schedule", "step", "--epochs", "4", "--step-epochs", "2,9"], "--step-epochs 2,9: each must be between 1 and --epochs 4"),
    (["--stages", "two"], "argument --stages: invalid int value: 'two'"),
    (["--boundaries", "a,b"], "argument --boundaries: 'a,b' is not comma-separated integers such as 10,19,28"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--num-processes", "2", "--process-id", "2"], "--process-id 2: must be between 0 and --num-processes - 1 = 1"),
    (["--num-processes", "2", "--emulate"], "--emulate runs on one device of one process"),
    (["--num-processes", "2", "--collective-timeout", "0"], "--collective-timeout 0: must be >= 1 (seconds)"),
]


@pytest.mark.parametrize("flags,message", BAD_INPUT, ids=[" ".join(f) for f, _ in BAD_INPUT])
def test_bad_flags_give_one_line_and_exit_code_2(tmp_path, capsys, flags, message):
    workdir = tmp_path / "run"
    assert cli.main(SMALL + ["--workdir", str(workdir)] + flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith("fdbp-train: error: ") and message in err, err
    assert not workdir.exists()


def write_sentinel(workdir):
    workdir.mkdir()
    (workdir / "summary.json").write_text('{"run": "earlier"}')


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    workdir = tmp_path / "run"
    write_sentinel(workdir)
    assert cli.main(SMALL + ["--workdir", str(workdir)]) == 2
    assert "already holds a run (summary.json): pass --resume to continue it or --overwrite" in capsys.readouterr().err
    assert (workdir / "summary.json").read_text() == '{"run": "earlier"}'


def test_resume_without_checkpoint(tmp_path, capsys):
    assert cli.main(SMALL + ["--workdir", str(tmp_path), "--resume"]) == 2
    assert f"--resume: no checkpoint in {tmp_path}/checkpoints; start without --resume" in capsys.readouterr().err


def test_unwritable_workdir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(SMALL + ["--workdir", str(blocker / "run")]) == 2
    assert f"--workdir {blocker}/run is not writable" in capsys.readouterr().err


def test_absent_dataset(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "empty"))
    assert cli.main(SMALL + ["--workdir", str(tmp_path / "run"), "--train-examples", "32"]) == 2
    err = capsys.readouterr().err
    assert "dataset 'cifar10' is not prepared under" in err and "set TFDS_DATA_DIR" in err and err.count("\n") == 1


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="--lr 0.0"):
        cli.main(SMALL + ["--workdir", str(tmp_path), "--lr", "0", "--debug"])


def tiny(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return data_lib.ArrayDataset(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                                 rng.integers(0, 10, n).astype(np.int32))


TINY = dict(model="cnn", stages=2, data_parallel=2, batch_size=16, schedule="constant", log_every=1, eval_batch_size=32)


def test_divergence_stops_with_tick_epoch_stage(tmp_path):
    with pytest.raises(train.Diverged, match=r"non-finite gradient at tick \d+ \(epoch 1\), first in stage \d; "
                                             r"no checkpoint was written yet\. Lower --lr"):
        train.train_and_evaluate(Config(**TINY, lr=1e30, epochs=2), str(tmp_path), datasets=(tiny(), tiny(32, 1)),
                                 show_progress=False)
    assert not os.listdir(tmp_path / "checkpoints")


def test_skip_nonfinite_counts_skipped_updates(tmp_path):
    result = train.train_and_evaluate(Config(**TINY, lr=1e30, epochs=1, skip_nonfinite=True), str(tmp_path),
                                      datasets=(tiny(), tiny(32, 1)), show_progress=False)
    assert result.summary["skipped_updates"] > 0 and result.summary["epochs_completed"] == 1


@pytest.mark.parametrize("use_mesh", [False, True])
def test_nonfinite_flags_follow_the_schedule_and_can_be_skipped(use_mesh):
    """A NaN batch entering at tick 2 reaches the last stage's gradient at tick 3 and stage 0's at tick 4."""
    xs, ys = toy.batches(6, batch=4)
    xs[2, 0, 0, 0, 0] = np.nan
    flags = {}
    for skip in (False, True):
        trainer = fj.Trainer([toy.FlattenDense(8), toy.DenseHead()], toy.cross_entropy, optax.sgd(0.1),
                             mesh=fj.make_mesh(2, 2) if use_mesh else None, skip_nonfinite=skip)
        state = trainer.init(jax.random.key(0), xs[0])
        seen = []
        for x, y in zip(xs, ys):
            state, metrics = trainer.step(state, x, y)
            seen.append(np.asarray(metrics["nonfinite"]).tolist())
        flags[skip] = seen
        finite = all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(trainer.stage_variables(state)))
        assert finite == skip
    assert flags[True] == [[False, False], [False, False], [False, False], [False, True], [True, False], [False, False]]
    assert flags[False][:4] == flags[True][:4] and flags[False][4:] == [[True, True], [True, True]]  # NaN weights


@pytest.mark.parametrize("use_mesh", [False, True])
def test_a_skipped_update_also_keeps_the_model_state_of_before(use_mesh):
    """A NaN batch with BatchNorm: its forward's statistics are not kept when its update is skipped."""
    xs, ys = toy.batches(6, batch=4)
    xs[2, 0, 0, 0, 0] = np.nan
    trainer = fj.Trainer(toy.conv_stages(2, batch_norm=True), toy.cross_entropy, optax.sgd(0.1),
                         mesh=fj.make_mesh(2, 2) if use_mesh else None, replicas=None if use_mesh else 2,
                         skip_nonfinite=True)
    state = trainer.init(jax.random.key(0), xs[0])
    for x, y in zip(xs, ys):
        state, metrics = trainer.step(state, x, y)
    variables = trainer.stage_variables(state)
    assert "batch_stats" in variables[0]
    for stage in variables:
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(stage)), stage.keys()


RUNNER = textwrap.dedent("""
    import sys, jax
    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np
    from fdbp_jax import train, data
    from fdbp_jax.config import Config
    d = np.load(sys.argv[1])
    sets = (data.ArrayDataset(d["x"], d["y"]), data.ArrayDataset(d["x"][:32], d["y"][:32]))
    config = Config(model="cnn", stages=2, data_parallel=2, batch_size=8, schedule="constant", epochs=3,
                    log_every=1, eval_batch_size=32, seed=1)
    result = train.train_and_evaluate(config, sys.argv[2], resume=sys.argv[3] == "resume", datasets=sets,
                                      show_progress=False)
    np.savez(sys.argv[2] + "/final.npz", *jax.tree.leaves(result.trainer.stage_variables(result.state)))
    print("INTERRUPTED" if result.summary["interrupted_at"] else "DONE", flush=True)
""")


def run_training(data_file, workdir, mode, sig=None):
    """Train in a subprocess; with `sig`, send it once the first checkpoint exists (early in epoch 2)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": ""}
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(data_file), str(workdir), mode],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if sig is not None:
        checkpoints, deadline = workdir / "checkpoints", time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir()):
                time.sleep(0.1)
                proc.send_signal(sig)
                break
            time.sleep(0.01)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    data = tiny(128)
    np.savez(folder / "data.npz", x=data.images, y=data.labels)
    code, out = run_training(folder / "data.npz", folder / "run", "start")
    assert code == 0 and "DONE" in out, out
    return folder


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_run_resumes_to_the_same_parameters(uninterrupted, tmp_path, sig):
    workdir = tmp_path / "killed"
    code, out = run_training(uninterrupted / "data.npz", workdir, "start", sig=sig)
    if sig == signal.SIGTERM:
        assert code == 0 and "INTERRUPTED" in out, out  # finished its tick, wrote a checkpoint, exited
        meta = json.load(open(workdir / "summary.json"))["interrupted_at"]
        assert meta["epoch"] >= 1
    else:
        assert code == -signal.SIGKILL and not (workdir / "final.npz").exists(), out
    code, out = run_training(uninterrupted / "data.npz", workdir, "resume")
    assert code == 0 and "DONE" in out, out
    epochs = [json.loads(line)["epoch"] for line in open(workdir / "metrics.jsonl") if '"eval"' in line]
    assert epochs[-1] == 3 and sorted(set(epochs)) == [1, 2, 3]
    expected, got = np.load(uninterrupted / "run" / "final.npz"), np.load(workdir / "final.npz")
    assert len(expected.files) == len(got.files) > 0
    for name in expected.files:
        np.testing.assert_array_equal(expected[name], got[name])


def test_unreadable_latest_checkpoint_falls_back_to_the_previous_and_is_kept(tmp_path, capsys):
    datasets = (tiny(32), tiny(32, 1))
    config = Config(**TINY, epochs=2, lr=0.05)
    train.train_and_evaluate(config, str(tmp_path), datasets=datasets, show_progress=False)
    latest = tmp_path / "checkpoints" / "4"
    for path in (latest / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(b"")  # truncated on disk
    resumed = train.train_and_evaluate(Config(**TINY, epochs=2, lr=0.05), str(tmp_path), resume=True,
                                       datasets=datasets, show_progress=False)
    err = capsys.readouterr().err
    assert "checkpoint 4 in" in err and "is unreadable" in err and "moved to" in err
    assert [h["epoch"] for h in resumed.summary["history"]] == [1, 2]  # epoch 2 was trained again from tick 2
    kept = list((tmp_path / checkpoint.UNREADABLE).iterdir())  # moved aside, not deleted
    assert len(kept) == 1 and kept[0].name.startswith("4-") and (kept[0] / "state").is_dir()


def test_damaged_metadata_of_the_latest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    datasets = (tiny(32), tiny(32, 1))
    config = Config(**TINY, epochs=2, lr=0.05)
    train.train_and_evaluate(config, str(tmp_path), datasets=datasets, show_progress=False)
    damaged = [path for path in (tmp_path / "checkpoints" / "4" / "meta").rglob("*") if path.is_file()]
    for path in damaged:
        path.write_text("{not json")
    assert damaged
    resumed = train.train_and_evaluate(config, str(tmp_path), resume=True, datasets=datasets, show_progress=False)
    assert "checkpoint 4 in" in capsys.readouterr().err
    assert [h["epoch"] for h in resumed.summary["history"]] == [1, 2]  # settings checked on checkpoint 2, used


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-epoch run (constant schedule) whose checkpoints the resume tests copy."""
    folder = tmp_path_factory.mktemp("finished")
    train.train_and_evaluate(Config(**TINY, epochs=2, lr=0.05), str(folder), datasets=(tiny(32), tiny(32, 1)),
                             show_progress=False)
    return folder


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_a_changed_stage_count_is_named_and_no_checkpoint_is_touched(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path)
    with pytest.raises(ValueError, match=r"made with other settings: stages 2 \(checkpoint\) vs 3 \(now\)"):
        train.train_and_evaluate(Config(**{**TINY, "stages": 3}, epochs=2, lr=0.05), str(run), resume=True,
                                 datasets=(tiny(32), tiny(32, 1)), show_progress=False)
    assert sorted(os.listdir(run / "checkpoints"), key=int) == ["2", "4"]
    assert not (run / checkpoint.UNREADABLE).exists()


def test_a_checkpoint_of_an_older_state_format_is_named_and_kept(finished_run, tmp_path):
    """A checkpoint written before the state changed format (no "state_format" in its metadata)
    gets one clear line, and no checkpoint is moved or removed."""
    run = copy_of(finished_run, tmp_path)
    rewritten = 0
    for path in (run / "checkpoints").glob("*/meta/**/*"):
        if path.is_file() and b'"state_format"' in path.read_bytes():  # the JSON item (orbax keeps others)
            meta = json.loads(path.read_text())
            meta.pop("state_format")
            path.write_text(json.dumps(meta))
            rewritten += 1
    assert rewritten == 2
    with pytest.raises(ValueError, match=r"checkpoint 4 .* holds state format 1, written by an older "
                                         rf"fdbp_jax; this one reads format {checkpoint.STATE_FORMAT}"):
        train.train_and_evaluate(Config(**TINY, epochs=2, lr=0.05), str(run), resume=True,
                                 datasets=(tiny(32), tiny(32, 1)), show_progress=False)
    assert sorted(os.listdir(run / "checkpoints"), key=int) == ["2", "4"]
    assert not (run / checkpoint.UNREADABLE).exists()


def test_more_epochs_resume_only_where_the_schedule_does_not_depend_on_them(finished_run, tmp_path):
    datasets = (tiny(32), tiny(32, 1))
    cosine = dict(TINY, schedule="cosine", lr=0.05)
    train.train_and_evaluate(Config(**cosine, epochs=1), str(tmp_path / "cosine"), datasets=datasets,
                             show_progress=False)
    with pytest.raises(ValueError, match=r"epochs 1 \(checkpoint\) vs 3 \(now\): the cosine learning-rate schedule is "
                                         r"laid out over --epochs.*keep --epochs 1"):
        train.train_and_evaluate(Config(**cosine, epochs=3), str(tmp_path / "cosine"), resume=True, datasets=datasets,
                                 show_progress=False)
    extended = train.train_and_evaluate(Config(**TINY, epochs=3, lr=0.05), str(copy_of(finished_run, tmp_path)),
                                        resume=True, datasets=datasets, show_progress=False)  # constant: extends
    assert [h["epoch"] for h in extended.summary["history"]] == [1, 2, 3]


def test_failed_collectives_are_told_from_other_errors():
    """What train_and_evaluate turns into LostProcess: the runtime's errors, also when wrapped (JAX's
    dispatch inside orbax's sync raised a ValueError "UNKNOWN: Gloo AllGather failed" here)."""
    gloo = ValueError("UNKNOWN: Gloo AllGather failed: [pair.cc:547] Connection closed by peer [127.0.0.1]:24773")
    assert train.collective_failed(gloo)
    try:
        try:
            raise gloo
        except ValueError as err:
            raise RuntimeError("orbax: save failed") from err
    except RuntimeError as wrapped:
        assert train.collective_failed(wrapped)
    assert not train.collective_failed(ValueError("--lr 0.0: must be > 0"))
    assert not train.collective_failed(train.Diverged("training diverged: non-finite gradient at tick 3"))
