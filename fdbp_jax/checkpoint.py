"""Run folders and checkpoints: the workdir checks (never mix two runs; writable before training;
resume only with the same settings; each done once, by process 0, in a multi-process run), and orbax checkpoints the whole engine state (every stage's params, optimizer and model
state, and the in-flight pipeline: stashes and messages) plus JSON metadata (position, config)."""

from __future__ import annotations

import dataclasses

import os
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fdbp_jax import distributed
from fdbp_jax.config import RESUMABLE_CHANGES, Config
from fdbp_jax.engines import AUTO_STASH
from fdbp_jax.optim import lr_schedule

UNREADABLE = "unreadable-checkpoints"  # where restore moves checkpoints it cannot read (kept, never deleted)
RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json", "tensorboard", UNREADABLE)
# what a checkpoint's state means: 2 since the FDBP mesh keeps one message per link phase
# (`engines/_link_swap.py`) instead of an activation and a gradient message; 3 since the stash rings
# are one array per slot (`engines._flat.SlotLayout`) and the input pipeline draws each epoch's order
# and each batch's augmentation at the batch level (`input_pipeline.py`: an older checkpoint's data
# iterator would not continue the stream it started); 4 since the FDBP mesh reads each backward's row
# straight from its stash ring and keeps no due rows (`engines/fdbp_mesh.py`); 5 since a stash ring holds
# stage_delay rows, not one more (`schedule.stash_depth`)
STATE_FORMAT = 5


class Checkpoints:
    """Atomic, numbered checkpoints under `directory`; keeps the last `keep`."""

    def __init__(self, directory: str, keep: int = 3):
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
            item_names=("state", "meta"),
        )

    @staticmethod
    def finished_steps(directory: str) -> list[int]:
        """The steps of the finished checkpoints in `directory`, read from its folder names (nothing is
        created; a checkpoint still being written has a temporary name)."""
        return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        meta = {**meta, "state_format": STATE_FORMAT}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def restore_state(self, step: int, like: Any) -> Any:
        """Restore the arrays of checkpoint `step` into the structure, shapes and shardings of the state `like`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]

    def read_meta(self, step: int) -> dict:
        """The JSON metadata of checkpoint `step` alone (position, settings), without its arrays."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def config_to_resume(self, config: Config) -> Config:
        """The settings a resumed run builds its engine with, from the newest readable checkpoint where
        `config` leaves them open: with --stash auto the mode it ran (its state holds that mode's rings,
        whatever auto would pick here), and without --boundaries the cut it ran, where it cut the same
        blocks into as many stages (a cut by --split-by time is measured anew each run, and may fall
        elsewhere). Other differences are left for `restore_latest` to name."""
        for step in reversed(self.all_steps()):
            try:
                meta = self.read_meta(step)
            except Exception:  # unreadable: restore_latest reports it and moves it aside
                continue
            saved = Config.from_json(meta["config"])
            stash = meta.get("stash") or saved.stash
            same_blocks = all(getattr(saved, key) == getattr(config, key) for key in ("model", "stages", "split_unit"))
            boundaries = meta.get("boundaries") if same_blocks and config.boundaries is None else None
            return dataclasses.replace(config, stash=stash if config.stash == AUTO_STASH else config.stash,
                                       boundaries=config.boundaries if boundaries is None else tuple(boundaries))
        return config

    def restore_latest(self, like: Any, config: Config, ticks_per_epoch: int) -> tuple[Any, dict, int]:
        """Restore the newest checkpoint that reads back whole, after checking that it was made with the
        settings of `config` (a ValueError naming each setting that differs). A checkpoint that cannot be
        read is reported on stderr and moved aside to UNREADABLE (never deleted: an I/O error may be
        passing), and the one before it is used. With several processes, every step is agreed by all."""
        for step in reversed(self.all_steps()):
            meta, error = None, None
            try:
                meta = self.read_meta(step)
            except Exception as err:  # orbax/tensorstore raise many types for damaged files
                error = err
            if not distributed.any_process(error is not None):
                differences = config_differences(meta["config"], config, ticks_per_epoch, meta.get("stash"))
                if differences:
                    raise ValueError(f"--resume: the checkpoint {step} in {self.manager.directory} was made with other "
                                     "settings: " + "; ".join(differences))
                if meta.get("state_format", 1) != STATE_FORMAT:
                    raise ValueError(f"--resume: the checkpoint {step} in {self.manager.directory} holds state "
                                     f"format {meta.get('state_format', 1)}, written by an older fdbp_jax; this one "
                                     f"reads format {STATE_FORMAT}: resume it with the version that wrote it, or start "
                                     "a new --workdir")
                try:
                    state = self.restore_state(step, like)
                except Exception as err:
                    error = err
                if not distributed.any_process(error is not None):
                    return state, meta, step
            self._move_aside(step, error)
        raise ValueError(f"--resume: no readable checkpoint in {self.manager.directory}")

    def _move_aside(self, step: int, error: Exception | None) -> None:
        """Move unreadable checkpoint `step` out of the manager's sight (process 0), and say where."""
        directory = str(self.manager.directory)
        target = os.path.join(os.path.dirname(directory), UNREADABLE, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")

        def move() -> None:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(os.path.join(directory, str(step)), target)

        distributed.on_process_zero(move)
        self.manager.reload()
        reason = type(error).__name__ if error is not None else "unreadable on another process"
        print(f"fdbp-train: checkpoint {step} in {directory} is unreadable ({reason}); moved to {target}, "
              "trying the one before it", file=sys.stderr)

    def close(self) -> None:
        self.manager.close()


def prepare_workdir(workdir: str, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder; check it is writable before any training. With several
    processes sharing the folder, process 0 alone checks (and, with --overwrite, clears) it while the
    others wait; a refusal is the same ValueError on every process."""
    distributed.on_process_zero(lambda: _prepare_workdir(workdir, resume, overwrite))


def _prepare_workdir(workdir: str, resume: bool, overwrite: bool) -> None:
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


def config_differences(saved: dict, config: Config, ticks_per_epoch: int, saved_stash: str | None = None) -> list[str]:
    """Each setting of `config` that differs from the checkpoint's `saved` one and would change the run.
    --epochs may change only where the learning rate of every update so far stays the same (constant,
    or step with explicit --step-epochs): the cosine and the default step schedules are laid out over
    --epochs, so a longer or shorter run is another run. --stash is compared with the mode the
    checkpoint ran (`saved_stash`, what its --stash auto chose); --stash auto takes that mode."""
    now = config.to_json()
    saved = Config.from_json(saved).to_json()  # a setting added since the checkpoint was written has its default
    saved["stash"] = saved_stash or saved["stash"]
    differences = [
        f"{key} {saved.get(key)!r} (checkpoint) vs {now[key]!r} (now)"
        for key in now
        if key not in RESUMABLE_CHANGES and saved.get(key) != now[key]
        and not (key == "stash" and now[key] == AUTO_STASH)
    ]
    if not differences and saved.get("epochs") != config.epochs:
        previous = Config.from_json(saved)
        updates = np.arange(min(previous.epochs, config.epochs) * ticks_per_epoch)
        same = np.array_equal(np.asarray(lr_schedule(previous, ticks_per_epoch)(updates)),
                              np.asarray(lr_schedule(config, ticks_per_epoch)(updates)))
        if not same:
            differences.append(
                f"epochs {previous.epochs} (checkpoint) vs {config.epochs} (now): the {config.schedule} learning-rate "
                f"schedule is laid out over --epochs, so this would be another run; keep --epochs {previous.epochs} "
                "(runs with --schedule constant, or step with explicit --step-epochs, can be extended on resume)")
    return differences
