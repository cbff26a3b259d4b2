"""Train a CIFAR model with FDBP or BP on a (data, stage) mesh: `fdbp-train` / `python -m fdbp_jax.train`.

`train_and_evaluate` is the whole job (data, split, engine, loop, eval, checkpoints, metrics);
`main` is its command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import sys
import threading
import time
from typing import Sequence

import jax
import numpy as np
import optax
from tqdm import tqdm

from fdbp_jax import data as data_lib
from fdbp_jax import distributed
from fdbp_jax.checkpoint import Checkpoints
from fdbp_jax.config import PRESETS, RESUMABLE_CHANGES, Config, validate
from fdbp_jax.mesh import make_mesh
from fdbp_jax.models import model_blocks, split_model
from fdbp_jax.optim import delay_factor, staleness_aware
from fdbp_jax.run_log import RunLog
from fdbp_jax.schedule import first_update_tick, stage_delay
from fdbp_jax.partition import block_costs, describe_split, linear_partition
from fdbp_jax.trainer import Trainer

IMAGE_SHAPE = (32, 32, 3)
RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json")
EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


@dataclasses.dataclass
class RunResult:
    """What a finished run leaves in memory: its summary, and the trainer and state to inspect."""

    summary: dict
    trainer: Trainer
    state: object


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def lr_schedule(config: Config, ticks_per_epoch: int) -> optax.Schedule:
    """Linear warm-up, then constant, step (/10 at `step_epochs`) or cosine decay, in updates."""
    total = max(1, config.epochs * ticks_per_epoch)
    warmup = min(total - 1, int(round(config.warmup_epochs * ticks_per_epoch)))
    if config.schedule == "constant":
        main = optax.constant_schedule(config.lr)
    elif config.schedule == "cosine":
        main = optax.cosine_decay_schedule(config.lr, total - warmup)
    else:
        epochs = config.step_epochs or (config.epochs // 2, (3 * config.epochs) // 4)
        main = optax.piecewise_constant_schedule(
            config.lr, {max(1, int(e * ticks_per_epoch) - warmup): 0.1 for e in epochs}
        )
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(config.lr / warmup, config.lr, warmup), main], [warmup])


def make_optimizer(
    config: Config, ticks_per_epoch: int
) -> optax.GradientTransformation | list[optax.GradientTransformation]:
    """SGD with (PyTorch-style, coupled) weight decay, momentum and the schedule. For FDBP with the
    staleness control on (the default), one per stage, its updates scaled for the stage's delay."""
    sgd = optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(lr_schedule(config, ticks_per_epoch), momentum=config.momentum or None),
    )
    if config.algorithm == "fdbp" and (config.staleness_power or config.staleness_warmup):
        return staleness_aware(sgd, config.stages, config.staleness_power, config.staleness_warmup)
    return sgd


def learning_rates(config: Config, ticks_per_epoch: int, tick: int) -> list[float]:
    """Each stage's step size after `tick` ticks: the schedule at the stage's update count (FDBP stage
    k updates from tick first_update_tick(k, K) on), times its staleness factor."""
    schedule_fn = lr_schedule(config, ticks_per_epoch)
    if config.algorithm == "bp":
        return [float(schedule_fn(tick))] * config.stages
    rates = []
    for k in range(config.stages):
        delay, updates = stage_delay(k, config.stages), max(0, tick - first_update_tick(k, config.stages))
        ramp = min(1.0, updates / (config.staleness_warmup * delay)) if config.staleness_warmup and delay else 1.0
        rates.append(float(schedule_fn(updates)) * delay_factor(delay, config.staleness_power) * ramp)
    return rates


def choose_boundaries(config: Config, blocks: Sequence, local_batch: int) -> tuple[list[int], list[float], list[int]]:
    """The configured boundaries, or the cost-balanced ones; with each block's FLOPs and params."""
    example = jax.ShapeDtypeStruct((local_batch, *IMAGE_SHAPE), np.float32)
    costs, params = block_costs(blocks, example)
    boundaries = list(config.boundaries) if config.boundaries is not None else linear_partition(costs, config.stages)
    return boundaries, costs, params


def prepare_workdir(workdir: str, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder; check it is writable before any training."""
    existing = [name for name in RUN_FILES if os.path.exists(os.path.join(workdir, name))]
    if existing and not resume and not overwrite:
        raise ValueError(
            f"--workdir {workdir} already holds a run ({', '.join(existing)}): pass --resume to continue it "
            "or --overwrite to replace it"
        )
    if overwrite and not resume:
        for name in existing:
            path = os.path.join(workdir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"--workdir {workdir} is not writable ({err.strerror}): choose another folder") from None


def config_differences(saved: dict, config: Config) -> list[str]:
    now = config.to_json()
    return [
        f"{key} {saved.get(key)!r} (checkpoint) vs {now[key]!r} (now)"
        for key in now
        if key not in RESUMABLE_CHANGES and saved.get(key) != now[key]
    ]


def evaluate(trainer: Trainer, state, dataset: data_lib.ArrayDataset, batch_size: int) -> float:
    """Top-1 accuracy with the current weights, in inference mode."""
    correct = 0
    for x, y in data_lib.eval_batches(dataset, batch_size):
        correct += int(np.sum(np.argmax(np.asarray(trainer.predict(state, x)), axis=-1) == y))
    return correct / len(dataset)


def load_datasets(config: Config) -> tuple[data_lib.ArrayDataset, data_lib.ArrayDataset]:
    return (
        data_lib.load_tfds(config.dataset, "train", config.train_examples),
        data_lib.load_tfds(config.dataset, "test", config.eval_examples),
    )


class Diverged(RuntimeError):
    """Training produced a non-finite gradient (and --skip-nonfinite was not given)."""


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop reads after each tick, so a run can stop cleanly."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _floats(values) -> list:
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(values, np.float64)]


def train_and_evaluate(
    config: Config,
    workdir: str,
    resume: bool = False,
    overwrite: bool = False,
    datasets: tuple[data_lib.ArrayDataset, data_lib.ArrayDataset] | None = None,
    show_progress: bool = True,
) -> RunResult:
    """Train `config` in `workdir`: orbax checkpoints each epoch (and on SIGINT/SIGTERM), metrics.jsonl,
    summary.json. Raises ValueError for bad settings and Diverged for a non-finite gradient."""
    validate(config)
    blocks = model_blocks(config.model)
    mesh = None if config.emulate else make_mesh(config.data_parallel, config.stages)
    prepare_workdir(workdir, resume, overwrite)
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    if resume and checkpoints.latest_step() is None:
        raise ValueError(f"--resume: no checkpoint in {workdir}/checkpoints; start without --resume")
    train_data, eval_data = datasets or load_datasets(config)
    if len(train_data) < config.batch_size:
        raise ValueError(f"--batch-size {config.batch_size}: larger than the {len(train_data)} training examples")
    ticks = data_lib.ticks_per_epoch(len(train_data), config.batch_size)
    boundaries, _, _ = choose_boundaries(config, blocks, config.batch_size // config.replicas)
    optimizer = make_optimizer(config, ticks)
    trainer = Trainer(
        split_model(blocks, boundaries), cross_entropy, optimizer, mesh=mesh,
        algorithm=config.algorithm, shrink=config.shrink, skip_nonfinite=config.skip_nonfinite,
        replicas=config.replicas if config.emulate else None,
    )
    state = trainer.init(jax.random.key(config.seed), np.zeros((config.batch_size, *IMAGE_SHAPE), np.float32))
    position = {"epoch": 0, "index": 0, "history": [], "wall_time_s": 0.0, "epoch_losses": [], "skipped_updates": 0}
    if resume:  # the settings are checked against the checkpoint actually restored, before any training
        state, meta, _ = checkpoints.restore_latest(state)
        differences = config_differences(meta["config"], config)
        if differences:
            raise ValueError(f"--resume: the checkpoint in {workdir} was made with other settings: " + "; ".join(differences))
        position = {key: meta[key] for key in position}
    previous_wall, history, skipped = position["wall_time_s"], position["history"], position["skipped_updates"]
    started, train_seconds, train_images, interrupted = time.time(), 0.0, 0, None

    def save(epoch: int, index: int, epoch_losses: list) -> None:
        checkpoints.save(epoch * ticks + index, state, {
            "epoch": epoch, "index": index, "tick": epoch * ticks + index, "config": config.to_json(),
            "history": history, "wall_time_s": previous_wall + time.time() - started,
            "epoch_losses": epoch_losses, "skipped_updates": skipped,
        })

    main_process = jax.process_index() == 0  # writes metrics and summary; every process checkpoints
    with RunLog(workdir, config.tensorboard, enabled=main_process) as log, StopRequest() as stop:

        def write(event: dict) -> None:
            log.write(event, learning_rates(config, ticks, event["tick"]))

        for epoch in range(position["epoch"], config.epochs):
            first = position["index"] if epoch == position["epoch"] else 0
            earlier = position["epoch_losses"] if epoch == position["epoch"] else []
            order = data_lib.epoch_order(len(train_data), config.seed, epoch)
            losses, flags, checked, epoch_start = [], [], 0, time.time()
            bar = tqdm(range(first, ticks), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not show_progress,
                       leave=False)
            for index in bar:
                x, y = data_lib.train_batch(train_data, order, config.seed, epoch, index, config.batch_size)
                state, metrics = trainer.step(state, x, y)
                losses.append(metrics["loss"])
                flags.append(metrics["nonfinite"])
                done = index + 1
                if done % config.log_every == 0 or done == ticks or stop.signal is not None:
                    bad = np.asarray(distributed.to_host(flags[checked:]))
                    checked = len(flags)
                    if bad.any() and not config.skip_nonfinite:
                        row, stage = np.argwhere(bad)[0]
                        tick = epoch * ticks + done - len(bad) + row + 1
                        last = checkpoints.latest_step()
                        raise Diverged(
                            f"training diverged: non-finite gradient at tick {tick} (epoch {epoch + 1}), first in "
                            f"stage {stage}; "
                            + (f"the last good checkpoint is step {last} in {workdir}/checkpoints" if last is not None
                               else "no checkpoint was written yet")
                            + ". Lower --lr, add --warmup-epochs or a --shrink below 1, or pass --skip-nonfinite"
                        )
                    skipped += int(bad.sum())
                    recent = np.asarray(distributed.to_host(losses[-config.log_every :]), np.float64)
                    rate = (done - first) * config.batch_size / (time.time() - epoch_start)
                    loss = float(np.nanmean(recent)) if np.isfinite(recent).any() else None
                    write({"event": "train", "epoch": epoch + 1, "tick": epoch * ticks + done, "loss": loss,
                           "images_per_s": rate, "skipped_updates": skipped})
                    bar.set_postfix(loss=f"{loss:.3f}" if loss is not None else "warm-up", img_s=f"{rate:.0f}")
                if stop.signal is not None and done < ticks:
                    interrupted = (epoch, done)
                    save(epoch, done, earlier + _floats(distributed.to_host(losses)))
                    break
            if interrupted:
                break
            epoch_seconds = time.time() - epoch_start
            train_seconds += epoch_seconds
            train_images += (ticks - first) * config.batch_size
            epoch_losses = np.asarray(earlier + _floats(distributed.to_host(losses)), np.float64)
            accuracy = evaluate(trainer, state, eval_data, config.eval_batch_size)
            history.append({
                "epoch": epoch + 1, "tick": (epoch + 1) * ticks, "test_accuracy": accuracy,
                "train_loss": float(np.nanmean(epoch_losses)) if np.isfinite(epoch_losses).any() else None,
                "images_per_s": (ticks - first) * config.batch_size / epoch_seconds,
                "wall_time_s": previous_wall + time.time() - started,
            })
            write({"event": "eval", **history[-1]})
            print(f"[process {jax.process_index()}] " * (jax.process_count() > 1) +
                  f"epoch {epoch + 1}/{config.epochs}: train loss {history[-1]['train_loss']}, "
                  f"test accuracy {accuracy:.4f}, {history[-1]['images_per_s']:.0f} images/s", flush=True)
            save(epoch + 1, 0, [])
            if stop.signal is not None:
                interrupted = (epoch + 1, 0)
                break
    checkpoints.close()
    summary = {
        "test_accuracy": history[-1]["test_accuracy"] if history else None,
        "best_test_accuracy": max((h["test_accuracy"] for h in history), default=None),
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "wall_time_s": previous_wall + time.time() - started,
        "images_per_s": train_images / train_seconds if train_seconds else None,
        "epochs_completed": len(history),
        "ticks_per_epoch": ticks,
        "skipped_updates": skipped,
        "interrupted_at": None if interrupted is None else {"epoch": interrupted[0], "index": interrupted[1]},
        "boundaries": boundaries,
        "history": history,
        "config": config.to_json(),
        "jax_version": jax.__version__,
        "devices": [str(d) for d in (mesh.devices.flat if mesh is not None else jax.devices()[:1])],
        "platform": jax.default_backend(),
    }
    if main_process:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return RunResult(summary, trainer, state)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors (unparsable values, unknown flags) become the CLI's one-line bad input."""

    def error(self, message: str):
        raise ValueError(message)


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated integers such as 10,19,28") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fdbp-train", description=__doc__.splitlines()[0])
    add = p.add_argument
    add("--preset", choices=sorted(PRESETS), help="start from a preset; other flags override it")
    add("--model", help="resnet20|resnet32|resnet44|resnet56|resnet110|cnn")
    add("--dataset", help="cifar10")
    add("--stages", type=int, help="K, pipeline stages")
    add("--data-parallel", type=int, help="N, data-parallel replicas per stage")
    add("--algorithm", help="fdbp (fully decoupled) or bp (synchronous backprop)")
    add("--shrink", type=float, help="gradient shrinking factor beta in (0, 1]")
    add("--epochs", type=int)
    add("--batch-size", type=int, help="global batch per tick")
    add("--lr", type=float)
    add("--momentum", type=float)
    add("--weight-decay", type=float)
    add("--schedule", help="constant|step|cosine")
    add("--step-epochs", type=int_list, help="e.g. 150,225,275")
    add("--warmup-epochs", type=float)
    add("--seed", type=int)
    add("--train-examples", type=int)
    add("--eval-examples", type=int)
    add("--boundaries", type=int_list, help="e.g. 10,19,28")
    add("--skip-nonfinite", action="store_true", default=None,
        help="skip (and count) updates whose gradient has NaN/inf instead of stopping with exit code 3")
    add("--emulate", action="store_true", default=None,
        help="run on one device, simulating the replicas the mesh run would have (FDBP: --data-parallel per "
             "stage; BP: --stages x --data-parallel)")
    add("--staleness-power", type=float,
        help="FDBP: scale stage k's updates by (1 + delay_k)^-power (default 1; 0 with --staleness-warmup 0 "
             "switches the control off: plain FDBP)")
    add("--staleness-warmup", type=int, help="FDBP: ramp stage k's updates up over this many updates per tick of delay")
    add("--keep-checkpoints", type=int, help="how many recent checkpoints to keep (default 3)")
    add("--eval-batch-size", type=int)
    add("--log-every", type=int)
    add("--coordinator-address", help="multi-host: host:port of process 0 (else from the cluster's environment)")
    add("--num-processes", type=int, help="multi-host: number of processes")
    add("--process-id", type=int, help="multi-host: this process's index")
    add("--workdir", default="runs/latest")
    add("--resume", action="store_true", help="continue the run in --workdir from its latest checkpoint")
    add("--overwrite", action="store_true", help="replace a run already in --workdir")
    add("--show-split", action="store_true", help="print the stage split and exit")
    add("--no-progress", action="store_true")
    add("--no-tensorboard", dest="tensorboard", action="store_false", default=None,
        help="write metrics.jsonl only, no TensorBoard event files")
    add("--debug", action="store_true", help="show tracebacks")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    values = dict(PRESETS.get(args.preset, {}))
    for field in dataclasses.fields(Config):
        given = getattr(args, field.name, None)
        if given is not None:
            values[field.name] = given
    return Config(**values)


def simulate_devices(count: int) -> None:
    """Ask JAX for `count` CPU devices; it must run before any JAX computation starts the backend."""
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        pass  # backend already running: make_mesh reports a shortage


def check_processes(args: argparse.Namespace, config: Config) -> int:
    """The number of processes, after checking the multi-host flags against it and each other."""
    processes = args.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "1"))
    if processes < 1:
        raise ValueError(f"--num-processes {processes}: must be >= 1")
    if args.process_id is not None and not 0 <= args.process_id < processes:
        raise ValueError(f"--process-id {args.process_id}: must be between 0 and --num-processes - 1 = {processes - 1}")
    if processes > 1 and config.emulate:
        raise ValueError(f"--emulate runs on one device of one process: drop it or --num-processes {processes}")
    return processes


def main(argv: Sequence[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        config = config_from_args(args)
        validate(config)
        devices = 1 if config.emulate else max(1, config.stages) * max(1, config.data_parallel)
        processes = check_processes(args, config)
        simulate_devices(max(1, devices // processes))
        if args.coordinator_address or processes > 1:
            distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
        if jax.default_backend() == "cpu" and devices > 1 and not args.show_split:
            print(f"fdbp-train: no accelerator, simulating {devices} CPU devices (data={config.data_parallel} x "
                  f"stage={config.stages}) on {os.cpu_count()} cores", flush=True)
        if args.show_split:
            blocks = model_blocks(config.model)
            boundaries, costs, params = choose_boundaries(config, blocks, config.batch_size // config.replicas)
            print(describe_split(blocks, boundaries, costs, params))
            return 0
        summary = train_and_evaluate(
            config, args.workdir, args.resume, args.overwrite, show_progress=not args.no_progress
        ).summary
    except (ValueError, data_lib.DatasetUnavailable) as err:
        if debug:
            raise
        print(f"fdbp-train: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Diverged as err:
        if debug:
            raise
        print(f"fdbp-train: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    if summary["interrupted_at"] is not None:
        again = " ".join(a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--resume", "--overwrite"))
        print(f"fdbp-train: stopped by signal at epoch {summary['interrupted_at']['epoch'] + 1}, tick "
              f"{summary['interrupted_at']['index']} of the epoch; checkpoint written. Continue with: "
              f"fdbp-train {again} --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(json.dumps({k: summary[k] for k in ("test_accuracy", "best_test_accuracy", "final_train_loss",
                                              "wall_time_s", "images_per_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
