"""Speed-model predictions for FDBP (K stages x N replicas) and data-parallel BP on the same K*N
devices, from XLA's FLOP counts per block and assumed accelerator and link numbers.

    python experiments/predict_speedup.py [--tflops-resnet 25 --tflops-wrn 200 --link-gbps 450 --latency-us 10]

Assumptions (H100 SXM-class, bf16 activations): effective training throughput per GPU (small CIFAR
convs use a small fraction of the 989 TFLOP/s dense peak), NVLink bandwidth per direction and
per-message latency. Each stage's forward is taken as 1/3 and backward as 2/3 of its forward+backward
FLOPs; the stash recomputes the forward (recompute=True) as the engine does by default.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fdbp_jax import models, partition, perf  # noqa: E402


def stage_costs(name: str, K: int, tflops: float) -> list[perf.StageCost]:
    blocks = models.model_blocks(name)
    flops, params = partition.block_costs(blocks, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    cut = partition.linear_partition(flops, K)
    edges = [0, *cut, len(blocks)]
    shapes, h = [], jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    for stage in models.split_model(blocks, cut):
        variables = jax.eval_shape(stage.init, jax.random.key(0), h)
        h = jax.eval_shape(lambda v, x: stage.apply(v, x), variables, h)
        shapes.append(h)
    costs = []
    for k, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        seconds = sum(flops[a:b]) / (tflops * 1e12)
        costs.append(perf.StageCost(seconds / 3, 2 * seconds / 3, 2 * shapes[k].size, 4 * sum(params[a:b])))
    return costs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tflops-resnet", type=float, default=25.0)
    p.add_argument("--tflops-wrn", type=float, default=200.0)
    p.add_argument("--link-gbps", type=float, default=450.0)
    p.add_argument("--latency-us", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args(argv)
    link = perf.Link(args.link_gbps * 1e9, args.latency_us * 1e-6)
    print(f"{'model':<9} {'K':>2} {'N':>2} {'devices':>7} {'FDBP x':>7} {'BP x':>6} {'FDBP img/s':>11} {'BP img/s':>9}"
          f" {'1-dev img/s':>11}")
    for name, tflops in (("resnet56", args.tflops_resnet), ("wrn28_10", args.tflops_wrn)):
        for K, N in ((4, 1), (2, 2), (4, 2), (2, 4)):
            costs = stage_costs(name, K, tflops)
            s = perf.speedups(costs, args.batch, K, N, link)
            print(f"{name:<9} {K:>2} {N:>2} {K * N:>7} {s['fdbp_speedup']:>7.2f} {s['bp_speedup']:>6.2f} "
                  f"{s['fdbp_examples_per_s']:>11.0f} {s['bp_examples_per_s']:>9.0f} {s['single_examples_per_s']:>11.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
