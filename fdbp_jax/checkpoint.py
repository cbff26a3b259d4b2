"""Run folders and checkpoints: the workdir checks (never mix two runs; writable before training;
resume only with the same settings), and orbax checkpoints the whole engine state (every stage's params, optimizer and model
state, and the in-flight pipeline: stashes and messages) plus JSON metadata (position, config)."""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp

from fdbp_jax.config import RESUMABLE_CHANGES, Config

RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json", "tensorboard")


class Checkpoints:
    """Atomic, numbered checkpoints under `directory`; keeps the last `keep`."""

    def __init__(self, directory: str, keep: int = 3):
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
            item_names=("state", "meta"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """Restore checkpoint `step` into the structure, shapes and shardings of the state `like`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        return restored["state"], restored["meta"]

    def restore_latest(self, like: Any) -> tuple[Any, dict, int]:
        """Restore the newest checkpoint that reads back whole; a corrupted or truncated one is reported
        on stderr, the one before it is used, and the unreadable one is removed so training can
        write that step again."""
        unreadable = []
        for step in reversed(self.all_steps()):
            try:
                state, meta = self.restore(step, like)
            except Exception as err:  # orbax/tensorstore raise many types for damaged files
                print(f"fdbp-train: checkpoint {step} in {self.manager.directory} is unreadable "
                      f"({type(err).__name__}); trying the one before it", file=sys.stderr)
                unreadable.append(step)
                continue
            for bad in unreadable:
                self.manager.delete(bad)
            return state, meta, step
        raise ValueError(f"--resume: no readable checkpoint in {self.manager.directory}")

    def close(self) -> None:
        self.manager.close()


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
