"""Stage messages as swaps between neighbours: every stage gets the activation of k-1 and the
input-gradient of k+1, in one collective per link phase (one in all for K=2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fdbp_jax.engines import _link_swap


@pytest.mark.parametrize("num_stages", [1, 2, 3, 4, 5, 8])
def test_every_stage_gets_its_neighbours_messages(num_stages):
    K = num_stages
    mesh = jax.make_mesh((K,), ("stage",), devices=jax.devices()[:K])

    def branch(k):
        def run(_):
            activation, gradient = jnp.full((2, 3), 100.0 + k), jnp.full((2, 3), 200.0 + k)
            return _link_swap.outbox(k, K, activation, gradient, jnp.zeros((2, 3)))
        return run

    def receive(k):
        def run(received):
            activation, gradient = _link_swap.inbox(k, K, received)
            missing = jnp.full((2, 3), -1.0)
            return jnp.stack([missing if activation is None else activation, missing if gradient is None else gradient])
        return run

    def local(x):
        k = jax.lax.axis_index("stage")
        sent = jax.lax.switch(k, [branch(j) for j in range(K)], x)
        received = _link_swap.swap(sent, K)
        return jax.lax.switch(k, [receive(j) for j in range(K)], received)[None]

    step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("stage"), out_specs=P("stage")))
    x = jax.device_put(jnp.zeros((K,)), NamedSharding(mesh, P("stage")))
    got = np.asarray(step(x))
    assert len(_link_swap.outbox(0, K, 1, 2, 0)) == _link_swap.link_phases(K) == min(2, K - 1)
    for k in range(K):
        np.testing.assert_array_equal(got[k, 0], 100.0 + k - 1 if k > 0 else -1.0)  # the activation of k-1
        np.testing.assert_array_equal(got[k, 1], 200.0 + k + 1 if k < K - 1 else -1.0)  # the gradient of k+1
    lowered = step.lower(x).as_text()
    assert lowered.count("collective_permute") == _link_swap.link_phases(K)


@pytest.mark.parametrize("num_stages", [1, 2, 3, 4, 7])
def test_swap_at_a_run_time_stage_gives_the_same_messages(num_stages):
    """`swap_at`, for engines that pick a stage's operation at run time (GPipe, 1F1B): the activation of
    k-1 and the gradient of k+1 wherever those neighbours exist."""
    K = num_stages
    mesh = jax.make_mesh((K,), ("stage",), devices=jax.devices()[:K])

    def local(x):
        k = jax.lax.axis_index("stage")
        activation, gradient = jnp.full((2, 3), 100.0) + k, jnp.full((2, 3), 200.0) + k
        return jnp.stack(_link_swap.swap_at(k, K, activation, gradient))[None]

    step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("stage"), out_specs=P("stage")))
    got = np.asarray(step(jax.device_put(jnp.zeros((K,)), NamedSharding(mesh, P("stage")))))
    for k in range(1, K):
        np.testing.assert_array_equal(got[k, 0], 100.0 + k - 1)
    for k in range(K - 1):
        np.testing.assert_array_equal(got[k, 1], 200.0 + k + 1)
