"""Timetables of synchronous pipeline schedules (GPipe, 1F1B): which operation each stage runs at
each tick of one training step.

A schedule is, per stage, the order of its operations: ``("F", m)`` runs micro-batch m forward,
``("B", m)`` backpropagates it. `Timetable.from_orders` places every operation at the earliest tick
its stage is free and its input is there (one operation per stage per tick, a message arrives
the tick after it is sent):

- F(m) at stage k > 0 after F(m) at stage k-1;
- B(m) at stage k < K-1 after B(m) at stage k+1, and the last stage's B(m) after its F(m).

The engines fold the last stage's forward into its backward (loss and gradients at once), so a
schedule may leave the last stage's forwards out of its order: its B(m) then waits for F(m) of stage
K-2 instead of a tick of its own (1F1B does; GPipe keeps them, where they delay its last stage so that
its backwards overlap the other stages' backwards). The ticks run in lock step, each as long as its
slowest operation (`fdbp_jax.perf.pipeline_step_time`), so which is faster depends on the timetable,
not only on the bubble. GPipe and 1F1B differ in how many micro-batches a stage holds at once
(`buffer_depth`): M for GPipe, at most K for 1F1B.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

FORWARD, BACKWARD = "F", "B"
Op = tuple[str, int]  # (FORWARD or BACKWARD, micro-batch)
IDLE_CODE, FORWARD_CODE, BACKWARD_CODE = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Timetable:
    """ops[tick][stage]: the operation stage k runs at that tick, or None (idle)."""

    ops: tuple
    num_stages: int
    microbatches: int

    @classmethod
    def from_orders(cls, orders: Sequence[Sequence[Op]], microbatches: int) -> "Timetable":
        """Place each stage's operations (in the given order) at the earliest tick they can run."""
        K = len(orders)
        folded = not any(kind == FORWARD for kind, _ in orders[-1])
        for k, order in enumerate(orders):
            kinds = (BACKWARD,) if folded and k == K - 1 else (FORWARD, BACKWARD)
            expected = sorted((kind, m) for kind in kinds for m in range(microbatches))
            if sorted(order) != expected:
                raise ValueError(f"stage {k}'s order must run F and B of each of the {microbatches} micro-batches once"
                                 + (" (the last stage: B alone, or F and B)" if k == K - 1 else ""))
        done: dict[tuple[int, str, int], int] = {}  # (stage, kind, micro-batch) -> tick it ran
        position, ops = [0] * K, []
        while any(position[k] < len(orders[k]) for k in range(K)):
            tick = len(ops)
            row = []
            for k in range(K):
                op = orders[k][position[k]] if position[k] < len(orders[k]) else None
                ready = op is not None and all(done.get(need, tick) < tick for need in _needs(k, K, op, folded))
                row.append(op if ready else None)
            if not any(row):
                raise ValueError(f"schedule deadlocks at tick {tick}: no stage can run its next operation")
            for k, op in enumerate(row):
                if op is not None:
                    done[(k, *op)] = tick
                    position[k] += 1
            ops.append(tuple(row))
        return cls(tuple(ops), K, microbatches)

    @property
    def ticks(self) -> int:
        return len(self.ops)

    @property
    def bubble_fraction(self) -> float:
        """(K-1)/(M+K-1): the textbook idle share of a GPipe or 1F1B step, with a forward and a backward
        of equal length. The lock-step ticks' time is the timetable's (`fdbp_jax.perf.pipeline_step_time`)."""
        return (self.num_stages - 1) / (self.microbatches + self.num_stages - 1)

    def tick_of(self, k: int, op: Op) -> int:
        return next(t for t, row in enumerate(self.ops) if row[k] == op)

    def live_intervals(self, k: int) -> list[tuple[int, int, int]]:
        """(micro-batch, first tick, last tick) during which stage k holds a micro-batch's received
        activation or input-gradient: from the tick after it was sent to the stage's own B of it."""
        K, intervals = self.num_stages, []
        for m in range(self.microbatches):
            arrivals = []
            if k > 0:
                arrivals.append(self.tick_of(k - 1, (FORWARD, m)) + 1)
            if k < K - 1:
                arrivals.append(self.tick_of(k + 1, (BACKWARD, m)) + 1)
            if arrivals:
                intervals.append((m, min(arrivals), self.tick_of(k, (BACKWARD, m))))
        return intervals

    @property
    def buffer_depth(self) -> int:
        """Slots each stage needs for the micro-batches it holds, with micro-batch m in slot m % depth."""
        intervals = [self.live_intervals(k) for k in range(self.num_stages)]
        depth = max([1] + [sum(first <= t <= last for _, first, last in stage)
                           for stage in intervals for t in range(self.ticks)])
        for stage in intervals:  # held micro-batches are consecutive, so m % depth never collides
            for m, first, last in stage:
                for n, other_first, other_last in stage:
                    if m < n and m % depth == n % depth and first <= other_last and other_first <= last:
                        raise ValueError(f"micro-batches {m} and {n} would share a buffer slot")
        return depth

    def codes(self) -> tuple[np.ndarray, np.ndarray]:
        """(kind, micro-batch) as (ticks, K) int32 tables for the mesh engine: kind 0 idle, 1 F, 2 B."""
        kind = np.zeros((self.ticks, self.num_stages), np.int32)
        micro = np.zeros((self.ticks, self.num_stages), np.int32)
        for t, row in enumerate(self.ops):
            for k, op in enumerate(row):
                if op is not None:
                    kind[t, k] = FORWARD_CODE if op[0] == FORWARD else BACKWARD_CODE
                    micro[t, k] = op[1]
        return kind, micro


def _needs(k: int, num_stages: int, op: Op, folded: bool) -> list[tuple[int, str, int]]:
    """What op at stage k waits for; `folded`: the last stage runs its forwards inside its backwards."""
    kind, m = op
    if kind == FORWARD or (folded and k == num_stages - 1):
        return [(k - 1, FORWARD, m)] if k > 0 else []
    return [(k + 1, BACKWARD, m)] if k < num_stages - 1 else [(k, FORWARD, m)]
