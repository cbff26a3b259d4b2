"""1F1B (PipeDream-Flush, Narayanan et al., 2021): after K-1-k warm-up forwards, stage k alternates
one forward and one backward, then drains its backwards; one update per step. The same bubble as
GPipe, but a stage holds at most K micro-batches instead of M. The last stage runs each micro-batch's
forward and backward back to back, which the engines fold into one operation: its order lists the
backwards alone, each a tick after the micro-batch's activation arrives."""

from __future__ import annotations

from fdbp_jax.engines.timetable import BACKWARD, FORWARD, Op


def one_f_one_b_order(k: int, num_stages: int, microbatches: int) -> list[Op]:
    """Stage k's operations in 1F1B order: warm-up forwards, then F/B pairs, then the last backwards
    (the last stage: its backwards alone, its forwards folded into them)."""
    if k == num_stages - 1:
        return [(BACKWARD, m) for m in range(microbatches)]
    warmup = min(num_stages - 1 - k, microbatches)
    order = [(FORWARD, m) for m in range(warmup)]
    for m in range(microbatches - warmup):
        order += [(FORWARD, warmup + m), (BACKWARD, m)]
    return order + [(BACKWARD, m) for m in range(microbatches - warmup, microbatches)]
