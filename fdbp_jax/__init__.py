"""fdbp_jax: data parallelism combined with fully decoupled parallel backpropagation in JAX."""

from fdbp_jax.delays import DelayModel
from fdbp_jax.mesh import make_mesh
from fdbp_jax.partition import Split, split_blocks
from fdbp_jax.schedule import first_update_tick, stage_delay, stash_depth
from fdbp_jax.trainer import Trainer

__all__ = ["Trainer", "DelayModel", "make_mesh", "split_blocks", "Split", "stage_delay", "stash_depth", "first_update_tick"]
__version__ = "0.1.0"
