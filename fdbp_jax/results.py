"""Training results read back from disk, for reports: runs written by `train_and_evaluate` (a folder
with metrics.jsonl and summary.json) or by `experiments/gpu_study.py` (study.json + one metrics.jsonl
tagged by run), FDBP runs paired with the BP run of the same recipe, and their gaps."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

# settings that say which method ran, not which recipe: a BP and an FDBP run differing only here are a pair
METHOD_SETTINGS = ("algorithm", "stages", "boundaries", "split_unit", "staleness_power", "staleness_warmup",
                   "correction", "shrink", "emulate", "keep_checkpoints", "log_every", "eval_batch_size",
                   "skip_nonfinite", "tensorboard")


@dataclasses.dataclass
class Run:
    """One training: its settings, its per-epoch eval events and where it was read from."""

    name: str
    source: str
    config: dict
    evals: list[dict]
    train_events: list[dict] = dataclasses.field(default_factory=list)
    boundaries: list | None = None  # where the stages began (from the run's summary), if it says

    @property
    def method(self) -> str:
        if self.config["algorithm"] == "bp":
            return "BP"
        plain = " plain" if not self.config.get("staleness_power") else ""
        corrected = self.config.get("correction", "none")
        return f"FDBP K={self.config['stages']}{plain}" + ("" if corrected == "none" else f" {corrected}")

    @property
    def final(self) -> dict:
        return self.evals[-1] if self.evals else {}

    @property
    def recipe(self) -> tuple:
        """The settings that make two runs comparable. A run made before a setting existed lacks it, so
        it pairs only with runs of its own code (e.g. runs before and after the grain input pipeline)."""
        return tuple(sorted((k, json.dumps(v)) for k, v in self.config.items() if k not in METHOD_SETTINGS))


def read_jsonl(path: str) -> list[dict]:
    """Every whole JSON line of `path` (none if it does not exist)."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut short when a run was killed
    return rows


def load_runs(path: str) -> list[Run]:
    """Every run under `path`: a gpu_study output folder, a run folder, or folders of either."""
    path = os.path.normpath(path)
    if os.path.exists(os.path.join(path, "study.json")):
        with open(os.path.join(path, "study.json")) as f:
            study = json.load(f)
        events = read_jsonl(os.path.join(path, "metrics.jsonl"))
        return [
            Run(name, path, run["config"], [e for e in events if e.get("run") == name and e["event"] == "eval"],
                [e for e in events if e.get("run") == name and e["event"] == "train"],
                (run.get("summary") or {}).get("boundaries"))
            for name, run in study["runs"].items() if "config" in run
        ]
    if os.path.exists(os.path.join(path, "summary.json")) and os.path.exists(os.path.join(path, "metrics.jsonl")):
        with open(os.path.join(path, "summary.json")) as f:
            summary = json.load(f)
        events = read_jsonl(os.path.join(path, "metrics.jsonl"))
        return [Run(os.path.basename(path), os.path.dirname(path), summary["config"],
                    [e for e in events if e["event"] == "eval"], [e for e in events if e["event"] == "train"],
                    summary.get("boundaries"))]
    runs = []
    for entry in sorted(os.listdir(path)) if os.path.isdir(path) else ():
        if os.path.isdir(os.path.join(path, entry)):
            runs += load_runs(os.path.join(path, entry))
    return runs


def pairs(runs: Sequence[Run]) -> list[tuple[Run, Run]]:
    """(BP run, FDBP run) for every FDBP run that has a BP run of the same recipe, from the same folder
    if there is one (runs of one folder share code and machine), else from any."""
    bp = {run.recipe: run for run in runs if run.config["algorithm"] == "bp"}
    bp_here = {(run.source, run.recipe): run for run in runs if run.config["algorithm"] == "bp"}
    return [(bp_here.get((run.source, run.recipe), bp.get(run.recipe)), run) for run in runs
            if run.config["algorithm"] == "fdbp" and run.recipe in bp]


def gap_row(bp: Run, fdbp: Run) -> dict:
    """The gap of one pair at the FDBP run's last eval (both at the same tick where the BP run has it)."""
    last = fdbp.final
    same = [e for e in bp.evals if e["tick"] == last.get("tick")]
    reference = same[0] if same else bp.final
    c = fdbp.config
    return {
        "model": c["model"], "lr": c["lr"], "N": c["data_parallel"], "seed": c["seed"],
        "train_images": c.get("train_examples") or 50000, "method": fdbp.method,
        "split": None if fdbp.boundaries is None else ",".join(map(str, fdbp.boundaries)),
        "epochs": last.get("epoch"), "updates": last.get("tick"),
        "bp_accuracy": reference.get("test_accuracy"), "fdbp_accuracy": last.get("test_accuracy"),
        "accuracy_gap": reference["test_accuracy"] - last["test_accuracy"] if last and reference else None,
        "bp_train_loss": reference.get("train_loss"), "fdbp_train_loss": last.get("train_loss"),
        "train_loss_gap": (last["train_loss"] - reference["train_loss"]
                           if last.get("train_loss") is not None and reference.get("train_loss") is not None else None),
        "source": fdbp.source,
    }


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A markdown table of `rows`; columns are (header, key, format spec), None shown as '–'."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, key, spec in columns:
            value = row.get(key)
            cells.append("–" if value is None else format(value, spec))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
