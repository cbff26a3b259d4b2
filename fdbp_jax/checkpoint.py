"""Checkpoints through orbax: the whole engine state (every stage's params, optimizer and model
state, and the in-flight pipeline: stashes and messages) plus JSON metadata (position, config)."""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp


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
