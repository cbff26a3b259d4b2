"""Memory per device of deep FDBP pipelines: the compiled tick's peak and the stash, per stash mode.

    python experiments/deep_memory.py --models vit,resnet56,resnet110 --stages 4,8,16 --out docs/data

For each model and K (N = 1, global batch 128, the CLI's cost-balanced split and SGD) on K simulated
CPU devices: the per-device bytes of the compiled tick (`memory_analysis`: arguments + outputs +
temporaries - donated, the largest device's) and of the state's stash rings. Only compiles: nothing
is trained, so it runs in minutes on a laptop. The stash holds stage_delay(0, K) = 2(K - 1) forwards
on stage 0 (2K - 1 before 2026-12-07), so it grows with K while each stage's weights and activations shrink. Writes
<out>/deep-memory.json with provenance and prints a table. On simulated devices this host holds
every device's state: a stash of G per device needs K x G of host memory (the selective stash of the
ViT at K = 16, ~2 GiB per device, did not fit 24 GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import jax

jax.config.update("jax_num_cpu_devices", 16)

import numpy as np  # noqa: E402

import fdbp_jax as fj  # noqa: E402
from fdbp_jax.config import Config  # noqa: E402
from fdbp_jax.engines import STASH_MODES  # noqa: E402
from fdbp_jax.train import build_trainer  # noqa: E402

MiB = 2 ** 20


def measure(model: str, stages: int, stash: str, batch: int) -> dict:
    config = Config(model=model, stages=stages, data_parallel=1, batch_size=batch, stash=stash)
    trainer, boundaries = build_trainer(config, ticks_per_epoch=100, mesh=fj.make_mesh(1, stages))
    x, y = np.zeros((batch, 32, 32, 3), np.float32), np.zeros((batch,), np.int32)
    state = trainer.init(jax.random.key(0), x)
    analysis = trainer.compiled_step(state, x, y).memory_analysis()
    size = lambda name: int(getattr(analysis, f"{name}_size_in_bytes", 0))
    device_mib = lambda tree: sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree)) / MiB
    return {"model": model, "stages": stages, "stash": stash, "batch": batch, "boundaries": boundaries,
            "peak_mib": (size("argument") + size("output") + size("temp") - size("alias")) / MiB,
            "temporaries_mib": size("temp") / MiB,
            "stash_mib": device_mib((state.stash, state.stash_params, state.stash_model_state)),
            "params_mib": device_mib(state.params)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vit,resnet56,resnet110")
    p.add_argument("--stages", default="4,8,16")
    p.add_argument("--stashes", default="recompute,selective")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--out", default="runs/deep-memory")
    args = p.parse_args(argv)
    rows = []
    for model in args.models.split(","):
        for stages in map(int, args.stages.split(",")):
            for stash in args.stashes.split(","):
                if stash not in STASH_MODES:
                    raise SystemExit(f"--stashes {stash}: unknown; valid: {', '.join(STASH_MODES)}")
                rows.append(measure(model, stages, stash, args.batch))
                r = rows[-1]
                print(f"{model:>9} K={stages:<2} {stash:>9}: peak {r['peak_mib']:8.1f} MiB/device, stash "
                      f"{r['stash_mib']:7.1f}, params {r['params_mib']:5.2f}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    provenance = {"machine": platform.processor() or platform.machine(), "devices": "simulated CPU",
                  "jax": jax.__version__, "measured": "compiled memory_analysis (nothing executed)"}
    with open(os.path.join(args.out, "deep-memory.json"), "w") as f:
        json.dump({"provenance": provenance, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
