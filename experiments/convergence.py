"""Convergence to critical points: full-batch gradient norm over ticks for BP and FDBP.

    python experiments/convergence.py [--ticks 2000] [--max-extra 4] [--out docs]

A smooth non-convex problem: a K-stage tanh MLP (16-16-...-1) regressing a random teacher network on
512 synthetic examples, squared loss, minibatch SGD (32 examples per replica and tick, so the global
batch grows with N) through the single-device emulator. For K in {1, 2, 4}, N in {1, 2, 4}
(replicas), fixed and stochastic delays, constant and diminishing (1/sqrt(t+1)) step sizes it
records ||grad f(w_t)||^2 of the full objective, and plots min and average of it up to T against T
on log-log axes next to an O(1/sqrt(T)) reference line. Writes
<out>/convergence.json and .png. Fixed delays are the FDBP schedule 2(K-1-k) (K = 1 is BP);
stochastic ones add a random 0..max_extra ticks per stage and tick (fdbp_jax.DelayModel, seed 0;
K = 1 is then SGD with random bounded staleness).
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

import fdbp_jax as fj  # noqa: E402
from fdbp_jax.stages import Stage, predict_stages  # noqa: E402

WIDTH, EXAMPLES, BATCH_PER_REPLICA = 16, 512, 32
SCHEDULES = ("constant", "diminishing")


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


def full_gradient_norm(stages, x, y):
    """A jitted function of the stages' variables: ||grad f||^2 of the full-batch objective."""
    wrapped = [Stage(s) for s in stages]
    loss = lambda vs: squared(predict_stages(wrapped, vs, x), y)
    return jax.jit(lambda vs: sum(jnp.sum(g ** 2) for g in jax.tree.leaves(jax.grad(loss)(vs))))


def run(K: int, N: int, schedule: str, max_extra: int, ticks: int, lr: float, x, y, every: int) -> list[float]:
    stages = stages_for(K)
    sched = optax.constant_schedule(lr) if schedule == "constant" else (lambda t: lr / jnp.sqrt(t + 1.0))
    delays = fj.DelayModel(K, max_extra=max_extra, seed=0) if max_extra else None
    trainer = fj.Trainer(stages, squared, optax.sgd(sched), replicas=N, delays=delays)
    batch = BATCH_PER_REPLICA * N  # each worker takes 32 examples a tick: more workers, larger global batch
    state = trainer.init(jax.random.key(0), x[:batch], example_y=y[:batch])
    gradient_norm = full_gradient_norm(stages, x, y)
    norms = []
    order_rng = np.random.default_rng(1)
    for t in range(ticks):
        idx = order_rng.integers(0, EXAMPLES, batch)
        state, _ = trainer.step(state, x[idx], y[idx])
        if t % every == 0:
            norms.append(float(gradient_norm(trainer.stage_variables(state))))
    return norms


def running_average(norms: np.ndarray) -> np.ndarray:
    return np.cumsum(norms) / np.arange(1, len(norms) + 1)


def average_slope(norms: np.ndarray, every: int, start: int = 200) -> float:
    """Log-log slope of the running average of ||grad f||^2 from tick `start` to the end
    (O(1/sqrt(T)) is -0.5; steeper is faster)."""
    T = (np.arange(len(norms)) + 1) * every
    keep = T >= start
    return float(np.polyfit(np.log(T[keep]), np.log(running_average(norms)[keep]), 1)[0])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ticks", type=int, default=2000)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--max-extra", type=int, default=4, help="stochastic delays: up to this many extra ticks")
    p.add_argument("--out", default="docs")
    args = p.parse_args(argv)
    x, y = problem()
    results = {}
    for delays, max_extra in (("fixed", 0), ("stochastic", args.max_extra)):
        for schedule in SCHEDULES:
            for K in (1, 2, 4):
                for N in (1, 2, 4):
                    key = f"K={K} N={N} {delays} {schedule}"
                    results[key] = run(K, N, schedule, max_extra, args.ticks, args.lr, x, y, args.every)
                    norms = np.asarray(results[key])
                    print(f"{key:36s} final ||grad||^2 {norms[-1]:.2e}  min {norms.min():.2e}  "
                          f"avg {norms.mean():.2e}  avg slope {average_slope(norms, args.every):+.2f}", flush=True)
    with open(os.path.join(args.out, "convergence.json"), "w") as f:
        json.dump({"ticks": args.ticks, "every": args.every, "lr": args.lr, "max_extra": args.max_extra,
                   "runs": results}, f)
    plot(results, args.every, os.path.join(args.out, "convergence.png"))
    return 0


def plot(results: dict, every: int, path: str) -> None:
    """Rows: fixed, stochastic delays. Columns: K = 1, 2, 4 at N = 2 with each step size; N = 1, 2, 4 at K = 4."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(18, 9), sharey=True)
    for row, delays in zip(axes, ("fixed", "stochastic")):
        panels = [(f"{schedule} step, N=2", [(f"K={K}", f"K={K} N=2 {delays} {schedule}") for K in (1, 2, 4)])
                  for schedule in SCHEDULES]
        panels.append(("constant step, K=4", [(f"N={N}", f"K=4 N={N} {delays} constant") for N in (1, 2, 4)]))
        for ax, (title, curves) in zip(row, panels):
            for i, (name, key) in enumerate(curves):
                norms = np.asarray(results[key])
                T = (np.arange(len(norms)) + 1) * every
                ax.loglog(T, np.minimum.accumulate(norms), color=f"C{i}", label=f"min {name}")
                ax.loglog(T, running_average(norms), "--", color=f"C{i}", label=f"avg {name}")
            ax.loglog(T, norms[0] * (T / T[0]) ** -0.5, "k:", label="O(1/sqrt(T))")
            ax.set(title=f"{delays} delays, {title}", xlabel="ticks T", ylabel="||grad f||^2 up to T")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
