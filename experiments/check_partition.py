"""Print the cost-balanced splits of the CIFAR models on this machine's default device (a check that
they do not depend on the backend: they must equal the CPU's)."""

import jax
import jax.numpy as jnp

from fdbp_jax import models, partition

for name in ("cnn", "resnet20", "resnet56"):
    costs, _ = partition.block_costs(models.model_blocks(name), jax.ShapeDtypeStruct((128, 32, 32, 3), jnp.float32))
    print(jax.default_backend(), name, {K: partition.linear_partition(costs, K) for K in (2, 4)})
