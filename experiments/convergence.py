"""Convergence to critical points: full-batch gradient norm over ticks for BP and FDBP.

    python experiments/convergence.py [--ticks 2000] [--out docs]

A smooth non-convex problem: a K-stage tanh MLP (16-16-...-1) regressing a random teacher network on
512 synthetic examples, squared loss, minibatch SGD (batch 32) through the single-device emulator.
For K in {1, 2, 4}, N in {1, 2, 4} (replicas), constant and diminishing (1/sqrt(t+1)) step sizes it
records ||grad f(w_t)||^2 of the full objective, and plots min and average of it up to T against T
on log-log axes next to an O(1/sqrt(T)) reference line. Writes <out>/convergence.json and .png.
Delays are the fixed FDBP schedule 2(K-1-k); K = 1 is BP.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fdbp_jax as fj  # noqa: E402
from fdbp_jax.stages import Stage, predict_stages  # noqa: E402

WIDTH, EXAMPLES, BATCH = 16, 512, 32


class Tanh(nn.Module):
    features: int = WIDTH

    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(self.features)(x))


def squared(y_hat, y):
    return 0.5 * jnp.mean((y_hat[:, 0] - y) ** 2)


def problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(EXAMPLES, WIDTH)).astype(np.float32)
    teacher = [Tanh(), Tanh(), nn.Dense(1)]
    h = jnp.asarray(x)
    for i, layer in enumerate(teacher):
        h = layer.apply(layer.init(jax.random.key(100 + i), h), h)
    return x, np.asarray(h[:, 0])


def stages_for(K: int) -> list[nn.Module]:
    """Four layers in all (3 tanh + linear head), cut into K stages."""
    layers = [Tanh(), Tanh(), Tanh(), nn.Dense(1)]
    per = len(layers) // K
    return [nn.Sequential(layers[i * per:(i + 1) * per]) for i in range(K)]


def full_gradient_norm(stages, variables, x, y) -> float:
    wrapped = [Stage(s) for s in stages]
    loss = lambda vs: squared(predict_stages(wrapped, vs, x), y)
    grads = jax.grad(loss)(variables)
    return float(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads)))


def run(K: int, N: int, schedule: str, ticks: int, lr: float, x, y, every: int) -> list[float]:
    stages = stages_for(K)
    sched = optax.constant_schedule(lr) if schedule == "constant" else (lambda t: lr / jnp.sqrt(t + 1.0))
    trainer = fj.Trainer(stages, squared, optax.sgd(sched), replicas=N)
    state = trainer.init(jax.random.key(0), x[:BATCH], example_y=y[:BATCH])
    norms = []
    order_rng = np.random.default_rng(1)
    for t in range(ticks):
        idx = order_rng.integers(0, EXAMPLES, BATCH)
        state, _ = trainer.step(state, x[idx], y[idx])
        if t % every == 0:
            norms.append(full_gradient_norm(stages, trainer.stage_variables(state), x, y))
    return norms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ticks", type=int, default=2000)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--out", default="docs")
    args = p.parse_args(argv)
    x, y = problem()
    results = {}
    for schedule in ("constant", "diminishing"):
        for K in (1, 2, 4):
            for N in (1, 2, 4):
                key = f"K={K} N={N} {schedule}"
                results[key] = run(K, N, schedule, args.ticks, args.lr, x, y, args.every)
                norms = np.asarray(results[key])
                print(f"{key:28s} final ||grad||^2 {norms[-1]:.2e}  min {norms.min():.2e}  avg {norms.mean():.2e}",
                      flush=True)
    with open(os.path.join(args.out, "convergence.json"), "w") as f:
        json.dump({"ticks": args.ticks, "every": args.every, "lr": args.lr, "runs": results}, f)
    plot(results, args.every, os.path.join(args.out, "convergence.png"))
    return 0


def plot(results: dict, every: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for ax, schedule in zip(axes, ("constant", "diminishing")):
        for key, norms in results.items():
            if not key.endswith(schedule) or " N=2 " not in f" {key} ":
                continue
            norms = np.asarray(norms)
            T = (np.arange(len(norms)) + 1) * every
            ax.loglog(T, np.minimum.accumulate(norms), label=f"min {key.replace(' ' + schedule, '')}")
            ax.loglog(T, np.cumsum(norms) / np.arange(1, len(norms) + 1), "--", label=f"avg {key.replace(' ' + schedule, '')}")
        T = np.arange(1, len(norms) + 1) * every
        ax.loglog(T, norms[0] * (T / T[0]) ** -0.5, "k:", label="O(1/sqrt(T))")
        ax.set(title=f"{schedule} step size (N=2)", xlabel="ticks T", ylabel="||grad f||^2 up to T")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
