"""Delay arithmetic of fully decoupled backpropagation: which batch each stage touches at each tick.

Stage k of K runs the forward of batch ``t - k`` at tick ``t`` and the backward of batch
``t - k - stage_delay(k, K)``; the delay is the number of ticks between the two.
"""

from __future__ import annotations


def stage_delay(k: int, num_stages: int) -> int:
    """Ticks between stage k's forward of a batch and its backward of that batch: 2(K-1-k)."""
    return 2 * (num_stages - 1 - k)


def stash_depth(k: int, num_stages: int) -> int:
    """Forwards stage k keeps (its ring buffer length): the delay. Its backward at tick t reads the row of
    tick t - delay, the ring's oldest, before tick t's forward is written over it; the last stage keeps none."""
    return stage_delay(k, num_stages)


def forward_batch(tick, k: int):
    """Index of the batch stage k runs forward at `tick` (negative: warm-up, nothing real yet)."""
    return tick - k


def backward_batch(tick, k: int, num_stages: int):
    """Index of the batch whose gradient stage k applies at `tick` (negative: none yet)."""
    return tick - k - stage_delay(k, num_stages)


def first_update_tick(k: int, num_stages: int) -> int:
    """The first tick at which stage k has a gradient to apply: 2(K-1) - k."""
    return k + stage_delay(k, num_stages)


def stash_slot(tick, k: int, num_stages: int):
    """Ring-buffer slot of the forward stage k < K-1 ran at `tick`; the backward reads it back
    `stage_delay` ticks later, from ``stash_slot(tick - stage_delay(k, K), k, K)``: the slot that tick's
    own forward then takes, so the read comes first."""
    return tick % stash_depth(k, num_stages)


def has_forward(tick, k):
    """Whether stage k runs a real forward at `tick` (its model state updates then): tick >= k."""
    return forward_batch(tick, k) >= 0


def has_gradient(tick, k, num_stages: int):
    """Whether stage k applies a gradient at `tick`: from first_update_tick(k, K) on."""
    return backward_batch(tick, k, num_stages) >= 0


def loss_is_valid(tick, num_stages: int):
    """Whether the last stage's loss at `tick` belongs to a real batch: from tick K-1 on."""
    return has_forward(tick, num_stages - 1)

