"""The training front-end on this machine's devices: (1) the input pipeline's loop against the bare
jitted step (images/s of train_and_evaluate's second epoch vs `perf.time_steps` of the same step);
(2) float32 against bfloat16 compute for one FDBP tick on a (data 2, stage 4) mesh (step time,
message bytes, compiled temporary memory).

    python experiments/bench_frontend.py [--model cnn] [--images 4096] [--out runs/frontend.json]

Goal on a GPU: the loop at >= 90 % of the step's images/s. On a CPU-only machine the mesh devices
are simulated on its cores: the numbers are ratios on this machine, not multi-device speeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
import optax  # noqa: E402

import fdbp_jax as fj  # noqa: E402
from fdbp_jax import data as data_lib  # noqa: E402
from fdbp_jax import models, partition, perf  # noqa: E402
from fdbp_jax.config import Config  # noqa: E402
from fdbp_jax.losses import cross_entropy  # noqa: E402
from fdbp_jax.train import build_trainer, train_and_evaluate  # noqa: E402


def random_images(n: int, seed: int) -> data_lib.ArrayDataset:
    rng = np.random.default_rng(seed)
    return data_lib.ArrayDataset(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                                 rng.integers(0, 10, n).astype(np.int32))


def loop_vs_step(model: str, images: int, batch: int) -> dict:
    """BP on one device: the whole loop (grain pipeline, step, logging) against the bare step."""
    config = Config(model=model, algorithm="bp", stages=1, data_parallel=1, emulate=True, epochs=2, batch_size=batch,
                    lr=0.05, eval_examples=None, tensorboard=False, log_every=10)
    with tempfile.TemporaryDirectory() as workdir:
        summary = train_and_evaluate(config, workdir, datasets=(random_images(images, 0), random_images(batch, 1)),
                                     show_progress=False).summary
    loop = summary["history"][-1]["images_per_s"]  # the second epoch: compiled already
    trainer, _ = build_trainer(config, images // batch, None)
    x = np.random.default_rng(0).normal(size=(batch, 32, 32, 3)).astype(np.float32)
    y = np.zeros(batch, np.int32)
    _, seconds, _ = perf.time_steps(trainer, trainer.init(jax.random.key(0), x), x, y, steps=20)
    return {"loop_images_per_s": loop, "step_images_per_s": batch / seconds, "loop_share": loop * seconds / batch}


def precision(model: str, batch: int) -> dict:
    """One FDBP tick on a (2, 4) mesh in float32 and in bfloat16."""
    blocks = models.model_blocks(model)
    flops, _ = partition.block_costs(blocks, jax.ShapeDtypeStruct((batch // 2, 32, 32, 3), np.float32))
    stages = partition.join_blocks(blocks, partition.linear_partition(flops, 4))
    x = np.random.default_rng(0).normal(size=(batch, 32, 32, 3)).astype(np.float32)
    y = np.zeros(batch, np.int32)
    rows = {}
    for dtype in ("float32", "bfloat16"):
        trainer = fj.Trainer(stages, cross_entropy, optax.sgd(0.05, momentum=0.9), mesh=fj.make_mesh(2, 4),
                             compute_dtype=dtype, stash="recompute")  # as in its earlier runs
        state = trainer.init(jax.random.key(0), x)
        memory = trainer.compiled_step(state, x, y).memory_analysis()
        _, seconds, state = perf.time_steps(trainer, state, x, y, steps=10)
        rows[dtype] = {"tick_ms": 1e3 * seconds, "message_bytes_per_tick": sum(int(m.nbytes) for m in state.messages),
                       "temp_bytes": int(getattr(memory, "temp_size_in_bytes", 0))}
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cnn")
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--out", default="runs/frontend.json")
    args = p.parse_args(argv)
    result = {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(), "jax": jax.__version__,
              "model": args.model, "batch": args.batch,
              "loop_vs_step": loop_vs_step(args.model, args.images, args.batch),
              "precision": precision(args.model, args.batch)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    loop = result["loop_vs_step"]
    print(f"loop {loop['loop_images_per_s']:.0f} images/s, bare step {loop['step_images_per_s']:.0f} images/s: "
          f"the loop runs at {100 * loop['loop_share']:.0f} % of the step")
    for dtype, row in result["precision"].items():
        print(f"{dtype:>9}: tick {row['tick_ms']:.1f} ms, messages {row['message_bytes_per_tick'] / 2**20:.2f} MiB/tick, "
              f"temporaries {row['temp_bytes'] / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
