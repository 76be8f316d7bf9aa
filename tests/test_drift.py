"""The drift monitor: stationary scores stay quiet, a shift fires, NaN never reaches ADWIN."""

from __future__ import annotations

import random

from drift.monitor import ScoreMonitor


def feed(monitor: ScoreMonitor, scores) -> list:
    return [e for s in scores if (e := monitor.update(s, 1.75e9, "v1")) is not None]


def test_stationary_scores_raise_no_drift():
    rng = random.Random(0)
    monitor = ScoreMonitor(delta=0.002, min_scans=1000, cooldown_s=600)
    assert feed(monitor, [rng.uniform(0.0, 0.02) for _ in range(20000)]) == []


def test_a_shift_in_normal_scores_raises_drift_and_one_retrain_request():
    rng = random.Random(1)
    monitor = ScoreMonitor(delta=0.002, min_scans=1000, cooldown_s=600)
    feed(monitor, [rng.uniform(0.0, 0.02) for _ in range(5000)])
    events = feed(monitor, [rng.uniform(0.2, 0.4) for _ in range(5000)])
    assert events and events[0].mean_after > events[0].mean_before
    assert sum(e.action == "retrain_requested" for e in events) == 1


def test_nan_and_inf_are_rejected_and_counted_and_a_later_shift_still_fires():
    rng = random.Random(2)
    monitor = ScoreMonitor(delta=0.002, min_scans=1000, cooldown_s=600)
    feed(monitor, [rng.uniform(0.0, 0.02) for _ in range(3000)])
    assert feed(monitor, [float("nan"), float("inf"), float("-inf")]) == []
    assert monitor.rejected == 3
    assert feed(monitor, [rng.uniform(0.3, 0.5) for _ in range(3000)])
