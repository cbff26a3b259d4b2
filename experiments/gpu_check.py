"""GPU check: ResNet-20 on CIFAR-10, BP's jitted step vs the FDBP emulator (K=4) on one device.

    python experiments/gpu_check.py --tarball data/cifar10-jpeg-q75.tar.gz [--epochs 10]

Measures images/s of each (median step time after warm-up) and trains each for --epochs on the
same data and seed, then prints one table (the last lines). Goal on a GPU: the emulator within 10%
of BP's images/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fdbp_jax import data as data_lib  # noqa: E402
from fdbp_jax import perf  # noqa: E402
from fdbp_jax.config import Config  # noqa: E402
from fdbp_jax.models import model_blocks, split_model  # noqa: E402
from fdbp_jax.train import choose_boundaries, cross_entropy, make_optimizer, train_and_evaluate  # noqa: E402
from fdbp_jax.trainer import Trainer  # noqa: E402


def images_per_s(config: Config, steps: int = 30) -> float:
    blocks = model_blocks(config.model)
    boundaries, _, _ = choose_boundaries(config, blocks, config.batch_size)
    trainer = Trainer(split_model(blocks, boundaries), cross_entropy, make_optimizer(config, 100),
                      algorithm=config.algorithm)
    x = np.random.default_rng(0).normal(size=(config.batch_size, 32, 32, 3)).astype(np.float32)
    y = np.zeros(config.batch_size, np.int32)
    _, seconds, _ = perf.time_steps(trainer, trainer.init(jax.random.key(0), x), x, y, steps, warmup=5)
    return config.batch_size / seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tarball", default="data/cifar10-jpeg-q75.tar.gz")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-examples", type=int)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", default="runs/gpu_check")
    args = p.parse_args(argv)
    start = time.time()
    datasets = (data_lib.load_jpeg_tarball(args.tarball, "train", args.train_examples),
                data_lib.load_jpeg_tarball(args.tarball, "test"))
    print(f"decoded {len(datasets[0])} + {len(datasets[1])} images in {time.time() - start:.0f} s on "
          f"{jax.devices()[0].device_kind}", flush=True)
    base = Config(model="resnet20", stages=4, data_parallel=1, batch_size=args.batch_size, epochs=args.epochs,
                  lr=0.1, schedule="cosine", warmup_epochs=1, emulate=True, eval_batch_size=1000)
    rows = {}
    for name, config in (("BP (jit, 1 device)", dataclasses.replace(base, algorithm="bp", stages=1)),
                         ("FDBP emulator K=4", dataclasses.replace(base, algorithm="fdbp"))):
        speed = images_per_s(config)
        summary = train_and_evaluate(config, os.path.join(args.out, config.algorithm), overwrite=True,
                                     datasets=datasets, show_progress=False).summary
        rows[name] = {"images_per_s": speed, "test_accuracy": summary["test_accuracy"],
                      "wall_time_s": summary["wall_time_s"]}
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(rows, f, indent=1)
    bp = rows["BP (jit, 1 device)"]["images_per_s"]
    print(f"{'run':<22} {'images/s':>10} {'vs BP':>7} {'test acc %':>10} {'train s':>8}")
    for name, row in rows.items():
        print(f"{name:<22} {row['images_per_s']:>10.0f} {row['images_per_s'] / bp:>7.2f} "
              f"{100 * row['test_accuracy']:>10.2f} {row['wall_time_s']:>8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
