"""Small heterogeneous stages and data shared by the tests."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


class ConvStage(nn.Module):
    features: int
    stride: int = 1
    batch_norm: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.features, (3, 3), strides=self.stride, use_bias=not self.batch_norm)(x)
        if self.batch_norm:
            x = nn.BatchNorm(use_running_average=not train, momentum=0.8)(x)
        return nn.relu(x)


class FlattenDense(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return nn.tanh(nn.Dense(self.features)(x.reshape(x.shape[0], -1)))


class DenseHead(nn.Module):
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.classes)(x.reshape(x.shape[0], -1))


class Scalar(nn.Module):
    """h = w * x with one scalar weight, initialised to 1."""

    @nn.compact
    def __call__(self, x):
        return self.param("w", nn.initializers.ones, ()) * x


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def squared_error(outputs, targets):
    return 0.5 * jnp.mean((outputs - targets) ** 2)


class ConvPair(nn.Module):
    batch_norm: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = ConvStage(4, batch_norm=self.batch_norm)(x, train)
        return ConvStage(8, 2, batch_norm=self.batch_norm)(x, train)


class MLPHead(nn.Module):
    @nn.compact
    def __call__(self, x):
        return DenseHead()(FlattenDense(16)(x))


class WholeNet(nn.Module):
    batch_norm: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        return MLPHead()(ConvPair(self.batch_norm)(x, train))


def conv_stages(num_stages: int, batch_norm: bool = False) -> list[nn.Module]:
    """conv 8x8x3 -> conv stride 2 -> flatten+dense -> dense, cut into 1, 2 or 4 stages."""
    if num_stages == 4:
        return [ConvStage(4, batch_norm=batch_norm), ConvStage(8, 2, batch_norm=batch_norm), FlattenDense(16), DenseHead()]
    if num_stages == 2:
        return [ConvPair(batch_norm), MLPHead()]
    if num_stages == 1:
        return [WholeNet(batch_norm)]
    raise ValueError(f"no toy split into {num_stages} stages")


class NnxConvStage(nnx.Module):
    """ConvStage in flax.nnx (optionally with dropout)."""

    def __init__(self, in_features: int, features: int, stride: int = 1, batch_norm: bool = False,
                 dropout: float = 0.0, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(in_features, features, (3, 3), strides=stride, use_bias=not batch_norm, rngs=rngs)
        self.norm = nnx.BatchNorm(features, momentum=0.8, rngs=rngs) if batch_norm else None
        self.drop = nnx.Dropout(dropout, rngs=rngs) if dropout else None

    def __call__(self, x):
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        x = nnx.relu(x)
        return x if self.drop is None else self.drop(x)


class NnxFlattenDense(nnx.Module):
    def __init__(self, in_features: int, features: int, *, rngs: nnx.Rngs):
        self.dense = nnx.Linear(in_features, features, rngs=rngs)

    def __call__(self, x):
        return nnx.tanh(self.dense(x.reshape(x.shape[0], -1)))


def nnx_conv_stages(batch_norm: bool = False, dropout: float = 0.0, seed: int = 0) -> list[nnx.Module]:
    """conv_stages(4) in flax.nnx, on 8x8x3 inputs; created initialised from `seed`."""
    rngs = nnx.Rngs(seed)
    return [
        NnxConvStage(3, 4, batch_norm=batch_norm, dropout=dropout, rngs=rngs),
        NnxConvStage(4, 8, 2, batch_norm=batch_norm, rngs=rngs),
        NnxFlattenDense(4 * 4 * 8, 16, rngs=rngs),
        nnx.Linear(16, 10, rngs=rngs),
    ]


def batches(ticks: int, batch: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(ticks, batch, 8, 8, 3)).astype(np.float32),
        rng.integers(0, 10, size=(ticks, batch)).astype(np.int32),
    )


def max_relative_error(a, b) -> float:
    """Largest |a - b| / max|a| over all leaves of two pytrees of the same structure."""
    errors = [
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / max(float(np.max(np.abs(np.asarray(x)))), 1e-12))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    return max(errors)


def run(trainer, state, xs, ys):
    """Step through all batches; returns final state and the per-tick losses."""
    losses = []
    for x, y in zip(xs, ys):
        state, metrics = trainer.step(state, x, y)
        losses.append(float(metrics["loss"]))
    return state, np.asarray(losses)
