"""The GPU study runs end to end on CPU within its budget, and its report and the speed model read
what it leaves."""

import io
import json
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from fdbp_jax import perf
from fdbp_jax.engines import pipeline_timetable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def tiny_tarball(path, train: int, test: int) -> None:
    """A CIFAR-10-shaped JPEG tarball of noise images, classes in turn."""
    from PIL import Image

    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as archive:
        for split, count in (("train", train), ("test", test)):
            for i in range(count):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="JPEG")
                info = tarfile.TarInfo(f"{split}/{CLASSES[i % 10]}/{i:04d}.jpg")
                info.size = len(buffer.getvalue())
                archive.addfile(info, io.BytesIO(buffer.getvalue()))


def script(name: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", name), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One study: budget 90 s (it needs ~50 s here), 512 training images, the BP/FDBP pair of the quick CNN,
    one epoch."""
    folder = tmp_path_factory.mktemp("study")
    tarball = str(folder / "mini.tar.gz")
    tiny_tarball(tarball, 512, 100)
    out = str(folder / "out")
    start = time.time()
    result = script("gpu_study.py", "--tarball", tarball, "--out", out, "--budget-s", "90", "--train-examples", "512",
                    "--runs", "cnn-bp-lr0.05,cnn-fdbp4-lr0.05", "--epochs", "1", "--concurrency", "2",
                    "--costs-model", "cnn", "--costs-batches", "8", "--costs-stages", "2", "--costs-share", "0.5",
                    timeout=120)
    return result, time.time() - start, out, tarball


def test_study_runs_within_its_budget_and_leaves_flat_files(study):
    result, seconds, out, tarball = study
    assert result.returncode == 0, result.stdout + result.stderr
    assert seconds < 90 + 5  # the budget, plus the interpreter's start
    files = sorted(os.listdir(out))
    assert files == ["costs.json", "log.txt", "metrics.jsonl", "study.json"]
    summary = json.load(open(os.path.join(out, "study.json")))
    assert summary["costs"] == "finished" and summary["wall_s"] <= 90
    assert summary["provenance"]["data"] == {
        "tarball": "mini.tar.gz", "sha256": summary["provenance"]["data"]["sha256"], "train": 512, "test": 100}
    for name in ("cnn-bp-lr0.05", "cnn-fdbp4-lr0.05"):
        run = summary["runs"][name]
        assert run["status"] == "finished" and run["epochs_completed"] == 1 and 0 <= run["test_accuracy"] <= 1
    events = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert {(e["run"], e["event"]) for e in events} >= {("cnn-bp-lr0.05", "eval"), ("cnn-fdbp4-lr0.05", "eval")}
    assert [e["tick"] for e in events if e["event"] == "eval"] == [4, 4]  # 512 / 128 ticks in the epoch


def test_study_curves_feed_the_speed_model(study):
    _, _, out, _ = study
    measured = perf.load_costs(os.path.join(out, "costs.json"))
    assert measured["provenance"]["platform"] == "cpu" and [b for b, _ in measured["bp_step"]] == [8]
    stages = perf.stage_costs(measured, 2)
    assert len(stages) == 2 and all(s.work(8) > 0 for s in stages)
    predicted = os.path.join(out, "..", "predicted.json")
    result = script("predict_speedup.py", "--costs", os.path.join(out, "costs.json"), "--runs", out, "--target", "0",
                    "--devices", "2,4", "--batches", "128", "--microbatches", "8", "--out", predicted)
    assert result.returncode == 0, result.stderr
    rows = {(r["devices"], r["method"]): r for r in json.load(open(predicted))["rows"]}
    assert set(rows) == {(D, method) for D, N in ((2, 1), (4, 2))
                         for method in ("BP", f"FDBP K=2 x N={N}", f"GPipe K=2 M=8 x N={N}", f"1F1B K=2 M=8 x N={N}")}
    step, param_bytes = perf.bp_costs(measured)
    link = perf.Link(450e9, 10e-6)
    assert rows[(4, "BP")]["ms"] == pytest.approx(1e3 * perf.bp_step_time(step, param_bytes, 128, 4, link))
    assert rows[(4, "FDBP K=2 x N=2")]["ms"] == pytest.approx(1e3 * perf.fdbp_tick_time(stages, 128, 2, link))
    assert rows[(4, "BP")]["ticks"] == 4 and rows[(4, "BP")]["time_to_target"] == pytest.approx(4e-3 * rows[(4, "BP")]["ms"])
    assert rows[(2, "FDBP K=2 x N=1")]["ticks"] is None  # no K=2 run was trained
    for algorithm, name in (("gpipe", "GPipe"), ("1f1b", "1F1B")):  # exactly backprop: BP's ticks, own step times
        pipeline = rows[(4, f"{name} K=2 M=8 x N=2")]
        assert pipeline["local_batch"] == 8 and pipeline["ticks"] == 4
        timetable = pipeline_timetable(algorithm, 2, 8)
        assert pipeline["ms"] == pytest.approx(1e3 * perf.pipeline_step_time(stages, 128, 2, timetable, link))


def test_report_reads_the_study(study, tmp_path):
    _, _, out, _ = study
    result = script("gpu_report.py", out, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = open(tmp_path / "report.md").read()
    assert "| cnn | 0.05 | 1 | 0 | 512 | FDBP K=4 | 2,3,4 | 4 |" in report  # the pair, at equal updates
    assert os.path.getsize(tmp_path / "curves.png") > 0 and os.path.getsize(tmp_path / "gap.png") > 0


def test_study_refuses_bad_input_and_keeps_what_is_there(study, tmp_path):
    _, _, out, tarball = study
    before = open(os.path.join(out, "study.json")).read()
    result = script("gpu_study.py", "--tarball", tarball, "--out", out)
    assert result.returncode == 2 and "--out" in result.stderr and "already holds a study" in result.stderr
    assert open(os.path.join(out, "study.json")).read() == before
    result = script("gpu_study.py", "--tarball", tarball, "--out", str(tmp_path / "new"), "--runs", "nope")
    assert result.returncode == 2 and "--runs nope" in result.stderr
    result = script("gpu_study.py", "--tarball", str(tmp_path / "missing.tar.gz"), "--out", str(tmp_path / "new"))
    assert result.returncode == 2 and "--tarball" in result.stderr


def test_missing_grain_without_wheels_is_one_clear_message(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_study", os.path.join(ROOT, "experiments", "gpu_study.py"))
    gpu_study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_study)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "grain" else find_spec(name))
    with pytest.raises(SystemExit, match="no grain and --wheels .* holds no wheels"):
        gpu_study.install_missing_grain(str(tmp_path), str(tmp_path))


def test_deep_run_set_is_valid_settings_for_k8_and_k16():
    import importlib.util

    from fdbp_jax.config import Config, validate

    spec = importlib.util.spec_from_file_location("gpu_study", os.path.join(ROOT, "experiments", "gpu_study.py"))
    gpu_study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_study)
    deep = gpu_study.RUN_SETS["deep"]
    configs = [Config(**{**gpu_study.BASE, **gpu_study.GRID[name]}) for name in deep]
    for config in configs:
        validate(config)
    assert {c.model for c in configs} == {"vit", "resnet56", "resnet110"}
    assert {c.stages for c in configs if c.algorithm == "fdbp"} == {8, 16}
    assert {c.correction for c in configs} == {"none", "predict", "lookahead"}
