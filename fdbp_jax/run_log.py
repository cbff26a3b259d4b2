"""A run's metrics, written twice: one JSON object per event in metrics.jsonl (the record the tools
read) and TensorBoard scalars in <workdir>/tensorboard (what researchers watch; tensorboardX, no
TensorFlow). `tensorboard --logdir runs/` shows every run under runs/."""

from __future__ import annotations

import json
import os
from typing import Sequence

# metrics.jsonl keys shown in TensorBoard, per event kind
SCALARS = {
    "train": ("loss", "images_per_s", "skipped_updates"),
    "eval": ("test_accuracy", "train_loss", "images_per_s"),
}


class RunLog:
    """Appends events to `workdir`/metrics.jsonl and, if `tensorboard`, to TensorBoard event files;
    `enabled=False` (processes other than 0) writes nothing."""

    def __init__(self, workdir: str, tensorboard: bool = True, enabled: bool = True):
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if enabled else None
        self.board = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self.board = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)

    def write(self, event: dict, learning_rates: Sequence[float] = ()) -> None:
        """One event (with "event" and "tick"); `learning_rates`: each stage's step size at that tick."""
        if self.jsonl is None:
            return
        self.jsonl.write(json.dumps(event) + "\n")
        self.jsonl.flush()
        if self.board is not None:
            for key in SCALARS.get(event["event"], ()):
                if event.get(key) is not None:
                    self.board.add_scalar(f"{event['event']}/{key}", event[key], event["tick"])
            for k, rate in enumerate(learning_rates):
                self.board.add_scalar(f"learning_rate/stage{k}", rate, event["tick"])
            self.board.flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.board is not None:
            self.board.close()

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
