"""GPU study for one lent GPU machine (no network, no tensorflow-datasets): measure the device's
efficiency curves, then train a grid of BP / FDBP runs concurrently on the one GPU, within a hard
time budget, and leave a few flat files for `experiments/gpu_report.py`.

    mkdir -p data && cp ../shared/data/cifar10-jpeg-q75.tar.gz data/      # data/ is git-ignored
    .venv/bin/pip download --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 grain -d data/wheels
    rm data/wheels/numpy-*                       # the GPU machine's own numpy stays in use
    # device tool: carry ["data"], command:
    PYTHONPATH=. python3 experiments/gpu_study.py --tarball data/cifar10-jpeg-q75.tar.gz --out $OUT/gpu-study

The GPU machine has no grain (the input pipeline's library) and no network: the study installs it
from the carried wheels (--wheels, default data/wheels) into its scratch folder, without an index.

Phases, all inside --budget-s (default 480; the study never runs longer):
1. decode the JPEG tarball once into a scratch folder (the runs memory-map it);
2. `experiments/measure_costs.py` alone on the GPU for at most --costs-share of the budget;
3. the grid's trainings (`train_and_evaluate`, the single-device emulator for FDBP, the jitted step
   for BP), --concurrency at a time, each a separate process holding a fraction of GPU memory
   (XLA_PYTHON_CLIENT_MEM_FRACTION); at the deadline they are stopped (SIGTERM: the current tick
   ends, a checkpoint is written) and what they measured so far is kept.
Files in --out (flat): study.json (settings, provenance, each run's status and summary),
metrics.jsonl (every run's train/eval events, tagged with "run"), costs.json (the curves), log.txt.
Images/s of concurrent runs are shares of one GPU, not standalone speeds.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_FILES = ("study.json", "metrics.jsonl", "costs.json", "log.txt")

# The gap study at a realistic budget: what decides FDBP's gap to BP (model family, learning rate,
# seeds), all on full CIFAR-10 (JPEG-q75 copy), batch 128, one replica per stage (N=1), K=4 with the
# default staleness control. ResNet-20 at lr 0.1 is already measured (../shared/gpu-runs).
BASE = dict(batch_size=128, momentum=0.9, weight_decay=5e-4, schedule="cosine", warmup_epochs=1.0,
            data_parallel=1, emulate=True, eval_batch_size=1000, keep_checkpoints=1, log_every=50, tensorboard=False)
GRID = {
    "cnn-bp-lr0.05": dict(model="cnn", algorithm="bp", stages=1, lr=0.05),
    "cnn-fdbp4-lr0.05": dict(model="cnn", algorithm="fdbp", stages=4, lr=0.05),
    "r20-bp-lr0.05": dict(model="resnet20", algorithm="bp", stages=1, lr=0.05),
    "r20-fdbp4-lr0.05": dict(model="resnet20", algorithm="fdbp", stages=4, lr=0.05),
    "cnn-bp-lr0.1": dict(model="cnn", algorithm="bp", stages=1, lr=0.1),
    "cnn-fdbp4-lr0.1": dict(model="cnn", algorithm="fdbp", stages=4, lr=0.1),
    "cnn-bp-lr0.05-seed1": dict(model="cnn", algorithm="bp", stages=1, lr=0.05, seed=1),
    "cnn-fdbp4-lr0.05-seed1": dict(model="cnn", algorithm="fdbp", stages=4, lr=0.05, seed=1),
    # the second set (--runs second): N=2 replicas (BatchNorm statistics per replica), plain FDBP, K=2,
    # and a second seed of the ResNet-20 lr 0.1 pair
    "cnn-bp-lr0.05-n2": dict(model="cnn", algorithm="bp", stages=1, lr=0.05, data_parallel=2),
    "cnn-fdbp4-lr0.05-n2": dict(model="cnn", algorithm="fdbp", stages=4, lr=0.05, data_parallel=2),
    "cnn-bp-lr0.05-n2-seed1": dict(model="cnn", algorithm="bp", stages=1, lr=0.05, data_parallel=2, seed=1),
    "cnn-fdbp4-lr0.05-n2-seed1": dict(model="cnn", algorithm="fdbp", stages=4, lr=0.05, data_parallel=2, seed=1),
    "cnn-fdbp4plain-lr0.05": dict(model="cnn", algorithm="fdbp", stages=4, lr=0.05, staleness_power=0.0),
    "cnn-fdbp2-lr0.05": dict(model="cnn", algorithm="fdbp", stages=2, lr=0.05),
    "r20-bp-lr0.1-seed1": dict(model="resnet20", algorithm="bp", stages=1, lr=0.1, seed=1),
    "r20-fdbp4-lr0.1-seed1": dict(model="resnet20", algorithm="fdbp", stages=4, lr=0.1, seed=1),
}
# the deep set (--runs deep): K = 8 and 16 against BP on the deep models, plain and with the corrections
# (docs/staleness.md); ResNet-110 at K = 16 is the deepest pipeline the models cut into evenly
DEEP = {
    f"{tag}-{name}": dict(model=model, lr=lr, **settings)
    for tag, model, lr in (("vit", "vit", 0.05), ("r56", "resnet56", 0.1), ("r110", "resnet110", 0.1))
    for name, settings in (
        ("bp", dict(algorithm="bp", stages=1)),
        ("fdbp8", dict(algorithm="fdbp", stages=8)),
        ("fdbp8-predict", dict(algorithm="fdbp", stages=8, correction="predict")),
        ("fdbp8-lookahead", dict(algorithm="fdbp", stages=8, correction="lookahead")),
        ("fdbp16", dict(algorithm="fdbp", stages=16)),
        ("fdbp16-predict", dict(algorithm="fdbp", stages=16, correction="predict")),
    )
}
GRID.update(DEEP)
RUN_SETS = {"first": list(GRID)[:8], "second": list(GRID)[8:16], "deep": list(DEEP)}


def package_versions() -> dict:
    versions = {}
    for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint",
                 "numpy", "grain"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def command_output(command: list[str]) -> str | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=20, cwd=HERE).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def install_missing_grain(wheels: str, scratch: str) -> str | None:
    """Where grain was installed from local wheels (no index), or None when this Python has it."""
    if importlib.util.find_spec("grain") is not None:
        return None
    files = sorted(glob.glob(os.path.join(wheels, "*.whl")))
    if not files:
        raise SystemExit(f"gpu_study: this Python has no grain and --wheels {wheels} holds no wheels: download them "
                         "on a machine with an index (see this script's docstring) and carry that folder")
    site = os.path.join(scratch, "site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target", site,
                    *files], check=True)
    return site


def decode_data(tarball: str, scratch: str, train_examples: int | None, eval_examples: int | None) -> dict:
    """Decode the tarball once into .npy files the workers memory-map."""
    from fdbp_jax import data as data_lib

    sizes = {}
    for split, examples in (("train", train_examples), ("test", eval_examples)):
        try:
            dataset = data_lib.load_jpeg_tarball(tarball, split, examples)
        except data_lib.DatasetUnavailable as err:
            raise SystemExit(f"gpu_study: {err}: pass --tarball the CIFAR-10 JPEG tarball "
                             "(../shared/data/cifar10-jpeg-q75.tar.gz)") from None
        np.save(os.path.join(scratch, f"{split}_images.npy"), dataset.images)
        np.save(os.path.join(scratch, f"{split}_labels.npy"), dataset.labels)
        sizes[split] = len(dataset)
    return sizes


def run_worker(name: str, scratch: str) -> int:
    """One training of the grid (a child process): train_and_evaluate on the decoded data."""
    from fdbp_jax import data as data_lib
    from fdbp_jax.config import Config
    from fdbp_jax.cli import EXIT_INTERRUPTED
    from fdbp_jax.train import train_and_evaluate

    with open(os.path.join(scratch, "grid.json")) as f:
        config = Config.from_json(json.load(f)[name])
    datasets = tuple(
        data_lib.ArrayDataset(np.load(os.path.join(scratch, f"{split}_images.npy"), mmap_mode="r"),
                              np.load(os.path.join(scratch, f"{split}_labels.npy")))
        for split in ("train", "test")
    )
    result = train_and_evaluate(config, os.path.join(scratch, name), overwrite=True, datasets=datasets,
                                show_progress=False)
    return EXIT_INTERRUPTED if result.summary["interrupted_at"] is not None else 0


def stop(processes: dict, grace_s: float) -> None:
    """SIGTERM every live process (they checkpoint and exit), SIGKILL what is left after grace_s."""
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    end = time.time() + grace_s
    while time.time() < end and any(p.poll() is None for p in processes.values()):
        time.sleep(0.2)
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.wait()


def run_status(run: dict, epochs_completed: int, epochs: int) -> str:
    """finished (all epochs), partial (stopped by the budget) or failed (the worker's exit code)."""
    if run.get("returncode") == 0 and epochs_completed == epochs:
        return "finished"
    if run.get("stopped_by_budget"):
        return "partial"
    return f"failed (exit {run.get('returncode')})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tarball", default="data/cifar10-jpeg-q75.tar.gz")
    p.add_argument("--out", default="runs/gpu-study")
    p.add_argument("--budget-s", type=float, default=480.0, help="hard limit on the whole study's wall time")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--train-examples", type=int, help="default: all 50,000")
    p.add_argument("--eval-examples", type=int, help="default: all 10,000")
    p.add_argument("--runs", help=f"a set ({', '.join(RUN_SETS)}; default first) or comma-separated runs of the grid: {', '.join(GRID)}")
    p.add_argument("--concurrency", type=int, default=8, help="trainings at once on the one device")
    p.add_argument("--costs-share", type=float, default=0.3, help="most of the budget the curves may take (0: skip)")
    p.add_argument("--costs-model", default="resnet20")
    p.add_argument("--costs-batches", default="8,16,32,64,128,256")
    p.add_argument("--costs-stages", default="4,2", help="the K whose stage curves are measured")
    p.add_argument("--scratch", help="folder for decoded data and run folders (default: a new temporary one)")
    p.add_argument("--wheels", default="data/wheels", help="wheels of grain and its dependencies, installed "
                   "into the scratch folder where grain is missing (see above)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return run_worker(args.worker, args.scratch)

    started = time.time()
    deadline = started + args.budget_s - 5.0  # what is left after it: collecting the files
    names = RUN_SETS.get(args.runs or "first") or args.runs.split(",")
    unknown = [n for n in names if n not in GRID]
    if unknown:
        p.error(f"--runs {','.join(unknown)}: not in the grid; valid: {', '.join(GRID)}")
    if not os.path.exists(args.tarball):
        p.error(f"--tarball {args.tarball}: no such file; copy ../shared/data/cifar10-jpeg-q75.tar.gz into the checkout")
    if args.budget_s < 30 or args.concurrency < 1 or not 0 <= args.costs_share < 1:
        p.error("--budget-s must be >= 30, --concurrency >= 1 and --costs-share in [0, 1)")
    existing = [f for f in OUT_FILES if os.path.exists(os.path.join(args.out, f))]
    if existing:
        p.error(f"--out {args.out} already holds a study ({', '.join(existing)}): choose a new folder")
    os.makedirs(args.out, exist_ok=True)
    scratch = args.scratch or tempfile.mkdtemp(prefix="gpu-study-")
    os.makedirs(scratch, exist_ok=True)
    log = open(os.path.join(args.out, "log.txt"), "a")

    def say(message: str) -> None:
        line = f"[{time.time() - started:6.1f} s] {message}"
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    from fdbp_jax import results
    from fdbp_jax.config import Config, validate

    configs = {}
    for name in names:
        config = Config(**{**BASE, **GRID[name], "epochs": args.epochs, "train_examples": args.train_examples,
                           "eval_examples": args.eval_examples})
        validate(config)
        configs[name] = config.to_json()
    with open(os.path.join(scratch, "grid.json"), "w") as f:
        json.dump(configs, f)
    sizes = decode_data(args.tarball, scratch, args.train_examples, args.eval_examples)
    say(f"decoded {sizes['train']} train + {sizes['test']} test images into {scratch}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    site = install_missing_grain(args.wheels, scratch)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(HERE), site, env.get("PYTHONPATH")]))
    if site:
        say(f"grain installed from {args.wheels} into {site}")

    costs_status = "skipped"
    if args.costs_share > 0:
        costs_budget = args.costs_share * args.budget_s
        command = [sys.executable, os.path.join(HERE, "measure_costs.py"), "--model", args.costs_model,
                   "--batches", args.costs_batches, "--stages", args.costs_stages, "--budget-s", str(max(1.0, costs_budget * 0.8)),
                   "--out", os.path.join(args.out, "costs.json")]
        with open(os.path.join(scratch, "costs.log"), "w") as costs_log:
            process = subprocess.Popen(command, stdout=costs_log, stderr=subprocess.STDOUT, env=env)
            try:
                code = process.wait(timeout=max(1.0, min(costs_budget, deadline - time.time())))
                costs_status = "finished" if code == 0 else f"failed (exit {code})"
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                costs_status = "stopped at its share of the budget"
        with open(os.path.join(scratch, "costs.log")) as f:
            log.write("---- measure_costs\n" + f.read())
        say(f"efficiency curves: {costs_status}")

    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.85 / min(args.concurrency, len(names)):.3f}"
    pending, running, runs = list(names), {}, {}
    while (pending or running) and time.time() < deadline:
        while pending and len(running) < args.concurrency:
            name = pending.pop(0)
            output = open(os.path.join(scratch, f"{name}.log"), "w")
            running[name] = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--worker", name, "--scratch", scratch],
                stdout=output, stderr=subprocess.STDOUT, env=env)
            runs[name] = {"started_s": time.time() - started}
            say(f"started {name}")
        for name, process in list(running.items()):
            if process.poll() is not None:
                runs[name].update(returncode=process.returncode, ended_s=time.time() - started)
                del running[name]
                say(f"{name} ended (exit {process.returncode})")
        time.sleep(0.5)
    if running:
        say(f"budget reached: stopping {', '.join(running)}")
        stop(running, grace_s=max(0.0, min(15.0, started + args.budget_s - 3.0 - time.time())))
        for name, process in running.items():
            runs[name].update(returncode=process.returncode, ended_s=time.time() - started, stopped_by_budget=True)
    for name in pending:
        runs[name] = {"status": "not started (budget)"}

    with open(os.path.join(args.out, "metrics.jsonl"), "w") as metrics:
        for name in names:
            events = results.read_jsonl(os.path.join(scratch, name, "metrics.jsonl"))
            for event in events:
                metrics.write(json.dumps({"run": name, **event}) + "\n")
            summary_path = os.path.join(scratch, name, "summary.json")
            summary = json.load(open(summary_path)) if os.path.exists(summary_path) else None
            evals = [e for e in events if e.get("event") == "eval"]
            runs[name].update(
                config=configs[name],
                epochs_completed=len(evals),
                test_accuracy=evals[-1]["test_accuracy"] if evals else None,
                train_loss=evals[-1]["train_loss"] if evals else None,
                summary={k: v for k, v in summary.items() if k not in ("history", "config")} if summary else None,
            )
            runs[name].setdefault("status", run_status(runs[name], len(evals), args.epochs))
            log_path = os.path.join(scratch, f"{name}.log")
            if os.path.exists(log_path):
                with open(log_path) as f:
                    log.write(f"---- {name}\n" + f.read()[-20000:])
    study = {
        "argv": sys.argv[1:] if argv is None else list(argv),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": time.time() - started,
        "budget_s": args.budget_s,
        "provenance": {
            "host": platform.node(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "packages": package_versions(), "gpus": command_output(["nvidia-smi", "-L"]),
            "git_commit": command_output(["git", "rev-parse", "HEAD"]),
            "data": {"tarball": os.path.basename(args.tarball), "sha256": sha256(args.tarball), **sizes},
            "concurrency": args.concurrency, "mem_fraction": env["XLA_PYTHON_CLIENT_MEM_FRACTION"],
        },
        "costs": costs_status,
        "base_config": BASE,
        "runs": runs,
    }
    with open(os.path.join(args.out, "study.json"), "w") as f:
        json.dump(study, f, indent=1)
    log.close()
    if not args.scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    say_table = [f"{'run':<24} {'status':<9} {'epochs':>6} {'test acc %':>10} {'train loss':>10}"]
    for name in names:
        r = runs[name]
        acc = f"{100 * r['test_accuracy']:.2f}" if r.get("test_accuracy") is not None else "-"
        loss = f"{r['train_loss']:.3f}" if r.get("train_loss") is not None else "-"
        say_table.append(f"{name:<24} {r['status']:<9} {r.get('epochs_completed', 0):>6} {acc:>10} {loss:>10}")
    print("\n".join(say_table))
    print(f"study done in {time.time() - started:.0f} s (budget {args.budget_s:.0f} s); files in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
