"""GPipe (Huang et al., 2019): each stage runs the forwards of all M micro-batches, then all their
backwards; one update per step. Every stage holds all M micro-batches at once."""

from __future__ import annotations

from fdbp_jax.engines.timetable import BACKWARD, FORWARD, Op


def gpipe_order(k: int, num_stages: int, microbatches: int) -> list[Op]:
    """Stage k's operations in GPipe order: F of every micro-batch, then B of every micro-batch."""
    return [(FORWARD, m) for m in range(microbatches)] + [(BACKWARD, m) for m in range(microbatches)]
