"""The training loop: `train_and_evaluate` trains a registered model on a registered dataset with FDBP
or BP on a (data, stage) mesh (or the one-device emulator), evaluating, checkpointing and logging
each epoch. Its command line is `fdbp-train` (`fdbp_jax.cli`)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import threading
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from fdbp_jax import data as data_lib
from fdbp_jax import distributed
from fdbp_jax import input_pipeline as pipeline
from fdbp_jax.checkpoint import Checkpoints, prepare_workdir
from fdbp_jax.config import Config, validate
from fdbp_jax.engines import split_stash
from fdbp_jax.losses import cross_entropy
from fdbp_jax.mesh import make_mesh
from fdbp_jax.models import model_blocks
from fdbp_jax.optim import correction, learning_rates, make_optimizer
from fdbp_jax.partition import Split, split_blocks
from fdbp_jax.run_log import RunLog
from fdbp_jax.trainer import Trainer


@dataclasses.dataclass
class RunResult:
    """What a finished run leaves in memory: its summary, and the trainer and state to inspect."""

    summary: dict
    trainer: Trainer
    state: object


@dataclasses.dataclass
class Position:
    """Where a run stands, all of it saved in every checkpoint: the epoch, the tick within it, the
    data iterator's state there, and what the run has recorded so far."""

    epoch: int = 0
    index: int = 0
    data_state: dict | None = None
    history: list = dataclasses.field(default_factory=list)
    wall_time_s: float = 0.0
    epoch_losses: list = dataclasses.field(default_factory=list)
    skipped_updates: int = 0


class Diverged(RuntimeError):
    """Training produced a non-finite gradient (and --skip-nonfinite was not given)."""


def model_split(config: Config) -> Split:
    """The configured model (in --split-unit blocks) cut into --stages stages: at --boundaries, or
    cost-balanced by --split-by (`split_blocks`; "time" measures every block on this device, once per run),
    counting the stages' stash work that the algorithm and stash add (`engines.split_stash`)."""
    spec = data_lib.DATASETS[config.dataset]
    example = jax.ShapeDtypeStruct((config.batch_size // config.replicas, *spec.image_shape), np.float32)
    return split_blocks(model_blocks(config.model, spec.classes, config.split_unit), config.stages, example,
                        config.boundaries, measure=config.split_by,
                        stash=split_stash(config.algorithm, config.stash))


def load_datasets(config: Config) -> tuple[data_lib.ArrayDataset, data_lib.ArrayDataset]:
    return (
        data_lib.load_tfds(config.dataset, "train", config.train_examples),
        data_lib.load_tfds(config.dataset, "test", config.eval_examples),
    )


def build_trainer(config: Config, ticks_per_epoch: int, mesh) -> tuple[Trainer, list[int]]:
    """The model cut into stages, its optimizer(s) and the engine the settings ask for on `mesh`."""
    split = model_split(config)
    trainer = Trainer(
        split.stages, cross_entropy, make_optimizer(config, ticks_per_epoch),
        mesh=mesh, algorithm=config.algorithm, shrink=config.shrink, skip_nonfinite=config.skip_nonfinite,
        replicas=config.replicas if config.emulate else None, compute_dtype=config.dtype,
        microbatches=config.microbatches, stash=config.stash, correction=correction(config),
    )
    return trainer, split.boundaries


@jax.jit
def correct_predictions(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
    """How many valid rows the logits classify right, summed on device over the global batch (each row
    once, however many processes or stages hold a copy of it)."""
    return jnp.sum((jnp.argmax(logits, axis=-1) == labels) & valid)


def evaluate(trainer: Trainer, state, dataset: data_lib.ArrayDataset, config: Config) -> float:
    """Top-1 accuracy with the current weights, in inference mode; each process reads its rows of each
    global batch, and the count is reduced on device."""
    spec = data_lib.DATASETS[config.dataset]
    batch = -(-config.eval_batch_size // trainer.replicas) * trainer.replicas  # every replica gets rows
    rows = trainer.local_rows(batch)
    correct = 0
    for x, y, valid in pipeline.iterate(pipeline.eval_dataset(dataset, spec, batch, rows)):
        logits = np.asarray(trainer.predict(state, x, batch))[rows.start : rows.stop]
        correct = correct + correct_predictions(*trainer.global_batch(batch, logits, y, valid))
    return int(distributed.to_host(correct)) / len(dataset)


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop reads, so a run can stop cleanly. `agreed()` is what the
    loop acts on: with several processes, True on all of them when any one was signalled (asked at the
    same ticks on every process), so all stop at the same tick and write one checkpoint together."""

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

    def agreed(self) -> bool:
        """Whether any process has been asked to stop (a collective: call it at the same point on all)."""
        return distributed.any_process(self.signal is not None)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class LostProcess(RuntimeError):
    """A collective with the other processes of a multi-process run failed: one of them has died
    (killed, preempted, out of memory) or cannot be reached."""


RUNTIME_STATUS = re.compile(r"^(UNKNOWN|UNAVAILABLE|INTERNAL|DEADLINE_EXCEEDED|ABORTED|CANCELLED): ")


def collective_failed(err: BaseException | None) -> bool:
    """Whether `err` is, or was raised from, a failed call into JAX's runtime (a collective with a lost
    peer). It comes as a JaxRuntimeError, or (from some dispatch paths, e.g. inside orbax's sync) as
    another exception carrying the runtime's status, such as "UNKNOWN: Gloo AllGather failed"."""
    while err is not None:
        if isinstance(err, jax.errors.JaxRuntimeError) or RUNTIME_STATUS.match(str(err)):
            return True
        err = err.__cause__ or err.__context__
    return False


def lost_process_message(err: BaseException, workdir: str) -> str:
    """What a survivor of a lost peer says: what failed, what was kept and how to continue."""
    directory = os.path.join(workdir, "checkpoints")
    steps = Checkpoints.finished_steps(directory)
    kept = (f"the checkpoints in {directory} are intact (latest: tick {steps[-1]}): start every process again "
            "with --resume" if steps else "no checkpoint was written yet: start every process again")
    return (f"a collective with the other {jax.process_count() - 1} process(es) failed "
            f"({str(err).strip().splitlines()[0][:160]}): one of them has probably died (killed, preempted, out of "
            f"memory); {kept}")


def _floats(values) -> list:
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(values, np.float64)]


def check_finite(flags: list, config: Config, epoch: int, first_tick: int, last_checkpoint: int | None,
                 workdir: str) -> int:
    """Skipped updates among `flags` (K non-finite flags per tick from `first_tick` on), or Diverged."""
    bad = np.asarray(distributed.to_host(flags))
    if bad.any() and not config.skip_nonfinite:
        row, stage = np.argwhere(bad)[0]
        raise Diverged(
            f"training diverged: non-finite gradient at tick {first_tick + row} (epoch {epoch + 1}), first in "
            f"stage {stage}; "
            + (f"the last good checkpoint is step {last_checkpoint} in {workdir}/checkpoints"
               if last_checkpoint is not None else "no checkpoint was written yet")
            + ". Lower --lr, add --warmup-epochs or a --shrink below 1, or pass --skip-nonfinite"
        )
    return int(bad.sum())


def run_epoch(trainer: Trainer, state, batches, position: Position, ticks: int, config: Config, log: RunLog,
              stop: StopRequest, checkpoints: Checkpoints, workdir: str, show_progress: bool):
    """Train the rest of one epoch from `position` (updated in place): (state, per-tick losses of the
    epoch, whether a signal stopped it early). One process checks for a signal after every tick;
    several agree on it at every log point (`--log-every`), the ticks where they synchronise anyway."""
    epoch, first = position.epoch, position.index
    losses, flags, checked, started = [], [], 0, time.time()
    single = jax.process_count() == 1
    bar = tqdm(range(first, ticks), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not show_progress, leave=False)
    for index in bar:
        x, y = next(batches)
        state, metrics = trainer.step(state, x, y)
        losses.append(metrics["loss"])
        flags.append(metrics["nonfinite"])
        done = index + 1
        at_log_point = done % config.log_every == 0 or done == ticks
        if at_log_point or (single and stop.signal is not None):
            position.skipped_updates += check_finite(flags[checked:], config, epoch, epoch * ticks + first + checked + 1,
                                                     checkpoints.latest_step(), workdir)
            checked = len(flags)
            recent = np.asarray(distributed.to_host(losses[-config.log_every :]), np.float64)
            rate = (done - first) * config.batch_size / (time.time() - started)
            loss = float(np.nanmean(recent)) if np.isfinite(recent).any() else None
            tick = epoch * ticks + done
            log.write({"event": "train", "epoch": epoch + 1, "tick": tick, "loss": loss, "images_per_s": rate,
                       "skipped_updates": position.skipped_updates}, learning_rates(config, ticks, tick))
            bar.set_postfix(loss=f"{loss:.3f}" if loss is not None else "warm-up", img_s=f"{rate:.0f}")
            if done < ticks and stop.agreed():
                position.index, position.data_state = done, batches.get_state()
                return state, losses, True
    return state, losses, False


def train_and_evaluate(
    config: Config,
    workdir: str,
    resume: bool = False,
    overwrite: bool = False,
    datasets: tuple[Sequence, Sequence] | None = None,
    show_progress: bool = True,
) -> RunResult:
    """Train `config` in `workdir`: orbax checkpoints each epoch (and on SIGINT/SIGTERM), metrics.jsonl,
    TensorBoard, summary.json. Raises ValueError for bad settings, Diverged for a non-finite gradient
    and, with several processes, LostProcess when a collective with the others fails."""
    try:
        return _train_and_evaluate(config, workdir, resume, overwrite, datasets, show_progress)
    except Exception as err:
        if jax.process_count() == 1 or not collective_failed(err):
            raise
        raise LostProcess(lost_process_message(err, workdir)) from err


def _train_and_evaluate(config: Config, workdir: str, resume: bool, overwrite: bool,
                        datasets: tuple[Sequence, Sequence] | None, show_progress: bool) -> RunResult:
    validate(config)
    spec = data_lib.DATASETS[config.dataset]
    mesh = None if config.emulate else make_mesh(config.data_parallel, config.stages)  # enough devices?
    prepare_workdir(workdir, resume, overwrite)
    if resume and not Checkpoints.finished_steps(os.path.join(workdir, "checkpoints")):
        raise ValueError(f"--resume: no checkpoint in {workdir}/checkpoints; start without --resume")
    train_data, eval_data = datasets or load_datasets(config)  # before the checkpoints: absent data leaves no run
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    if len(train_data) < config.batch_size:
        raise ValueError(f"--batch-size {config.batch_size}: larger than the {len(train_data)} training examples")
    ticks = pipeline.ticks_per_epoch(len(train_data), config.batch_size)
    trainer, boundaries = build_trainer(checkpoints.config_to_resume(config) if resume else config, ticks, mesh)
    state = trainer.init(jax.random.key(config.seed), np.zeros((config.batch_size, *spec.image_shape), np.float32))
    position = Position()
    if resume:  # the settings are checked on the checkpoint to restore, before its arrays are read
        state, meta, _ = checkpoints.restore_latest(state, config, ticks)
        position = Position(**{f.name: meta[f.name] for f in dataclasses.fields(Position)})
    started, previous_wall, train_seconds, train_images, interrupted = time.time(), position.wall_time_s, 0.0, 0, None
    rows = trainer.local_rows(config.batch_size)

    def save() -> None:
        position.wall_time_s = previous_wall + time.time() - started
        checkpoints.save(position.epoch * ticks + position.index, state, {
            **dataclasses.asdict(position), "tick": position.epoch * ticks + position.index, "config": config.to_json(),
            "stash": trainer.stash,  # the mode --stash auto chose: a resumed run needs its rings
            "boundaries": boundaries,  # and the cut it ran
        })

    main_process = jax.process_index() == 0  # writes metrics and summary; every process checkpoints
    with RunLog(workdir, config.tensorboard, enabled=main_process) as log, StopRequest() as stop:
        while position.epoch < config.epochs:
            epoch, first, epoch_start = position.epoch, position.index, time.time()
            batches = pipeline.iterate(pipeline.train_dataset(train_data, spec, config.seed, epoch, config.batch_size,
                                                              rows), position.data_state)
            state, losses, stopped = run_epoch(trainer, state, batches, position, ticks, config, log, stop,
                                               checkpoints, workdir, show_progress)
            position.epoch_losses = position.epoch_losses + _floats(distributed.to_host(losses))
            if stopped:
                interrupted = (epoch, position.index)
                save()
                break
            epoch_seconds = time.time() - epoch_start
            train_seconds += epoch_seconds
            train_images += (ticks - first) * config.batch_size
            epoch_losses = np.asarray(position.epoch_losses, np.float64)
            accuracy = evaluate(trainer, state, eval_data, config)
            position.history.append({
                "epoch": epoch + 1, "tick": (epoch + 1) * ticks, "test_accuracy": accuracy,
                "train_loss": float(np.nanmean(epoch_losses)) if np.isfinite(epoch_losses).any() else None,
                "images_per_s": (ticks - first) * config.batch_size / epoch_seconds,
                "wall_time_s": previous_wall + time.time() - started,
            })
            log.write({"event": "eval", **position.history[-1]}, learning_rates(config, ticks, (epoch + 1) * ticks))
            print(f"[process {jax.process_index()}] " * (jax.process_count() > 1) +
                  f"epoch {epoch + 1}/{config.epochs}: train loss {position.history[-1]['train_loss']}, "
                  f"test accuracy {accuracy:.4f}, {position.history[-1]['images_per_s']:.0f} images/s", flush=True)
            position.epoch, position.index, position.data_state, position.epoch_losses = epoch + 1, 0, None, []
            save()
            if stop.agreed():
                interrupted = (epoch + 1, 0)
                break
    checkpoints.close()
    history = position.history
    summary = {
        "test_accuracy": history[-1]["test_accuracy"] if history else None,
        "best_test_accuracy": max((h["test_accuracy"] for h in history), default=None),
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "wall_time_s": previous_wall + time.time() - started,
        "images_per_s": train_images / train_seconds if train_seconds else None,
        "epochs_completed": len(history),
        "ticks_per_epoch": ticks,
        "skipped_updates": position.skipped_updates,
        "interrupted_at": None if interrupted is None else {"epoch": interrupted[0], "index": interrupted[1]},
        "boundaries": boundaries,
        "pipeline_bubble": getattr(trainer.engine, "bubble_fraction", None),  # gpipe / 1f1b: idle share of a step
        "stash": trainer.stash,  # FDBP on a mesh: the stash mode it ran (what --stash auto chose)
        "history": history,
        "config": config.to_json(),
        "jax_version": jax.__version__,
        "devices": [str(d) for d in (trainer.mesh.devices.flat if trainer.mesh is not None else jax.devices()[:1])],
        "platform": jax.default_backend(),
    }
    if main_process:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return RunResult(summary, trainer, state)
