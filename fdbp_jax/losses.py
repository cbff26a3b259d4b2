"""The classification loss the CLI, the benchmarks and the cost measurements train with."""

from __future__ import annotations

import jax
import numpy as np
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels, computed in float32 whatever the logits' dtype."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(np.float32), labels).mean()
