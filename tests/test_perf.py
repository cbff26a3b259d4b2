"""The speed model's arithmetic, on numbers small enough to check by hand."""

import pytest

from fdbp_jax import perf

LINK = perf.Link(bandwidth=100.0, latency=1.0)
# two stages: forward 1 s/example, backward 2 s/example; 10 activation bytes/example; 100 param bytes
STAGES = [perf.StageCost(1.0, 2.0, 10.0, 100.0), perf.StageCost(1.0, 2.0, 10.0, 100.0)]


def test_link():
    assert LINK.transfer(0) == 0.0 and LINK.transfer(50) == 1.5
    assert LINK.all_reduce(100, 1) == 0.0
    assert LINK.all_reduce(100, 2) == pytest.approx(2 * 1 * (1 + 50 / 100))  # 2(n-1) steps of 50 bytes


def test_fdbp_tick_is_the_slowest_stage():
    # batch 4, N = 2: 2 examples per replica. Stage 0: 2*(2*1 + 2) = 8 s compute (recomputed forward),
    # sends 20 bytes (1.2 s), all-reduce of 100 bytes over 2: 3 s -> 12.2 s. Stage 1: 2*(1+2) = 6 s,
    # receives 20 bytes (1.2 s), 3 s -> 10.2 s.
    assert perf.fdbp_tick_time(STAGES, 4, 2, LINK, recompute=True) == pytest.approx(12.2)
    assert perf.fdbp_tick_time(STAGES, 4, 2, LINK, recompute=False) == pytest.approx(10.2)


def test_bp_step_and_speedups():
    # 4 devices, 1 example each: 6 s compute; all-reduce 200 bytes over 4: 6 steps of (1 + 0.5) s = 9 s
    assert perf.bp_step_time(STAGES, 4, 4, LINK) == pytest.approx(15.0)
    assert perf.single_device_time(STAGES, 4) == 24.0
    s = perf.speedups(STAGES, 4, 2, 2, LINK, recompute=False)
    assert s["fdbp_speedup"] == pytest.approx(24 / 10.2) and s["bp_speedup"] == pytest.approx(24 / 15)


def test_shared_cores():
    # 2 cores, N = 2, stage work 8 s and 6 s per replica: (2 * 14) / 2 = 14 s > slowest stage 8 s
    assert perf.shared_cores_tick_time(STAGES, 4, 2, cores=2) == pytest.approx(14.0)
    assert perf.shared_cores_tick_time(STAGES, 4, 2, cores=64) == pytest.approx(8.0)
