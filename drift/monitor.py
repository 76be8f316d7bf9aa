"""Watching the detector's own scores and inputs for drift with River.

Four kinds of evidence, each a River detector:

- the top anomaly confidence of scans judged normal (ADWIN): when the network changes, normal
  scans start to look less normal before alerts explode;
- the hop time of normal moves relative to their bound (ADWIN): carriers getting slower or faster;
- the share of moves along routes or to sites the model does not know (HDDM-A on a bit stream):
  a new hub or new customers;
- the alert rate of each learned type (HDDM-A): the model's idea of normal has gone stale.

Scores of flagged scans are never fed to the score monitors, so a burst of real anomalies is not
drift, and the exact types (counterfeit codes, clones) are not watched at all: a wave of clones is
an attack, not a changed network. NaN and inf are rejected before they reach ADWIN, which one NaN
would disable for good. However many monitors fire, one retrain request is made per cooldown.

The detector feeds a whole batch at once (`observe_batch`): the statistics are picked out of the
batch's feature matrix with numpy, ADWIN (River's, compiled) takes each value, and HDDM-A runs
over a batch's bit stream in one vectorised pass (`BatchHDDMA`: River's HDDM-A test, same
detection points, without a Python call per scan).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from pydantic import BaseModel
from river import drift
from scipy.signal import lfilter

from detector.features import FEATURE_NAMES
from detector.schema import ANOMALY_TYPES

LEARNED_TYPES = ("locErr", "evtOrderErr", "jump")
_HOP = FEATURE_NAMES.index("log_hop_over_bound")
_MOVED = FEATURE_NAMES.index("has_previous")
_SAME_SITE = FEATURE_NAMES.index("same_site")
_UNKNOWN = (FEATURE_NAMES.index("route_unknown"), FEATURE_NAMES.index("site_unknown"))


class DriftEvent(BaseModel):
    """A drift event as published on `drift-events`."""

    drift_id: str
    monitor: str
    statistic: str
    mean_before: float
    mean_after: float
    scans_seen: int
    event_time_from: str
    event_time_to: str
    detector_instance: str
    model_version: str
    action: str
    detected_at: str


class BatchHDDMA:
    """River's HDDM-A drift test (one-sided: the mean rose) over a batch of values at once.

    HDDM-A keeps the running mean `z` and a cut point `x_min`: the past moment whose mean plus
    its Hoeffding bound was lowest. Drift is signalled when the mean has risen above the cut
    point's by more than the bound for the values since. The cut point is a running minimum, so
    a batch needs one `np.minimum.accumulate`; after a signal the test restarts from scratch, as
    River's does on its next update. River's per-value `update` cost ~100 µs a scan through its
    generic `clone`; `tests/test_drift.py` checks both signal at the same points.
    """

    def __init__(self, drift_confidence: float = 0.001) -> None:
        self.log_bound = math.log(1.0 / drift_confidence)
        self.log_test = math.log(2.0 / drift_confidence)
        self._reset()

    def _reset(self) -> None:
        self.n = 0.0
        self.sum = 0.0
        self.cut_n = 0.0  # 0: no cut point yet
        self.cut_mean = 0.0

    def signals(self, values: np.ndarray) -> list[int]:
        """Indices of `values` at which drift is signalled."""
        found: list[int] = []
        start = 0
        while start < len(values):
            at = self._first_signal(values[start:])
            if at is None:
                break
            found.append(start + at)
            start += at + 1
            self._reset()
        return found

    def _first_signal(self, x: np.ndarray) -> int | None:
        n = self.n + np.arange(1, len(x) + 1, dtype=np.float64)
        mean = (self.sum + np.cumsum(x, dtype=np.float64)) / n
        level = mean + np.sqrt(self.log_bound / (2.0 * n))
        cut_n, cut_mean = n, mean
        if self.cut_n:
            carried = self.cut_mean + math.sqrt(self.log_bound / (2.0 * self.cut_n))
            level = np.concatenate(([carried], level))
            cut_n = np.concatenate(([self.cut_n], n))
            cut_mean = np.concatenate(([self.cut_mean], mean))
        # A moment becomes the cut point when its level is at most the lowest level before it.
        lowest_before = np.concatenate(([np.inf], np.minimum.accumulate(level)[:-1]))
        positions = np.arange(len(level))
        cut = np.maximum.accumulate(np.where(level <= lowest_before, positions, 0))
        cut = cut[len(level) - len(x) :]
        since = n - cut_n[cut]
        with np.errstate(divide="ignore", invalid="ignore"):
            bound = np.sqrt(since / cut_n[cut] / n / 2.0 * self.log_test)
        risen = (since > 0) & (mean - cut_mean[cut] >= bound)
        if risen.any():
            return int(np.argmax(risen))
        self.n = float(n[-1])
        self.sum += float(x.sum())
        self.cut_n = float(cut_n[cut[-1]])
        self.cut_mean = float(cut_mean[cut[-1]])
        return None


class _Adwin:
    """River's ADWIN (compiled) fed value by value; `signals` as for `BatchHDDMA`."""

    def __init__(self, delta: float) -> None:
        self.detector = drift.ADWIN(delta=delta)

    def signals(self, values: np.ndarray) -> list[int]:
        detector = self.detector
        found = []
        for i, value in enumerate(values.tolist()):
            detector.update(value)
            if detector.drift_detected:
                found.append(i)
        return found


# The recent level of a statistic is an exponential average over about this many scans.
RECENT_SCANS = 1000


@dataclass
class _Watched:
    """One drift detector over one statistic, with the level it is compared against.

    River says *when* a stream changed; the change is reported only if the recent level moved
    at least `min_effect` from the reference level (the level after warm-up or after the last
    report), within `3 * RECENT_SCANS` values of the signal. Scan streams are not independent
    draws (a pallet's items share their hops), so a detector alone fires on differences too
    small to matter.
    """

    name: str
    statistic: str
    detector: BatchHDDMA | _Adwin
    seen: int = 0
    total: float = 0.0
    recent: float = 0.0
    reference: float | None = None
    pending: int = 0  # values left to confirm a change the detector signalled

    def feed(
        self, values: np.ndarray, min_scans: int, min_effect: float
    ) -> list[tuple[float, float]]:
        """Feed values in order; returns (level before, level after) of each confirmed change."""
        k = len(values)
        if not k:
            return []
        signals = self.detector.signals(values)
        seen = self.seen + np.arange(1, k + 1)
        cumulative = self.total + np.cumsum(values, dtype=np.float64)
        recent = self._recent_levels(values, seen, cumulative)
        changes: list[tuple[float, float]] = []
        first = max(0, min_scans - self.seen - 1)  # the first value past warm-up
        if first < k:
            if self.reference is None:
                self.reference = float(cumulative[first] / seen[first])
            pending_signals = [i for i in signals if i >= first]
            i = first
            while i < k:
                if not self.pending:
                    pending_signals = [s for s in pending_signals if s >= i]
                    if not pending_signals:
                        break
                    i = pending_signals[0]
                if pending_signals and pending_signals[0] == i:
                    self.pending = 3 * RECENT_SCANS
                    pending_signals.pop(0)
                self.pending -= 1
                if abs(recent[i] - self.reference) >= min_effect:
                    changes.append((self.reference, float(recent[i])))
                    self.reference = float(recent[i])
                    self.pending = 0
                i += 1
        self.seen += k
        self.total = float(cumulative[-1])
        self.recent = float(recent[-1])
        return changes

    def _recent_levels(
        self, values: np.ndarray, seen: np.ndarray, cumulative: np.ndarray
    ) -> np.ndarray:
        """The recent level after each value: the mean while warming up, then an EMA."""
        levels = np.empty(len(values))
        warm = int(np.searchsorted(seen, RECENT_SCANS, side="right"))
        levels[:warm] = cumulative[:warm] / seen[:warm]
        if warm < len(values):
            start = levels[warm - 1] if warm else self.recent
            alpha = 1.0 / RECENT_SCANS
            levels[warm:], _ = lfilter(
                [alpha], [1.0, alpha - 1.0], values[warm:], zi=[(1.0 - alpha) * start]
            )
        return levels


@dataclass
class ScoreMonitor:
    """All drift monitors of one detector, a shared warm-up and one retrain cooldown."""

    delta: float
    min_scans: int
    cooldown_s: float
    min_effect: float = 0.03
    instance: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    rejected: int = 0
    seen: int = 0
    fired: int = 0

    def __post_init__(self) -> None:
        self.first_t = math.inf
        self.last_t = -math.inf
        self.last_request = -math.inf
        self.score = _Watched("adwin", "normal_scan_max_confidence", _Adwin(self.delta))
        self.hops = _Watched("adwin", "normal_hop_time_over_bound", _Adwin(self.delta))
        self.unknown = _Watched("hddm_a", "share_of_moves_to_unknown_routes_or_sites", BatchHDDMA())
        self.rates = {t: _Watched("hddm_a", f"alert_rate_{t}", BatchHDDMA()) for t in LEARNED_TYPES}

    def update(self, score: float, event_t: float, model_version: str) -> DriftEvent | None:
        """Feed one normal scan's top confidence (and nothing else); returns a fired event."""
        if not math.isfinite(score):
            self.rejected += 1
            return None
        self._tick(np.array([event_t]))
        events = self._feed(self.score, np.array([min(1.0, max(0.0, score))]), model_version)
        return events[0] if events else None

    def observe(
        self,
        flagged: tuple[str, ...],
        confidence: float,
        features: np.ndarray,
        event_t: float,
        model_version: str,
    ) -> list[DriftEvent]:
        """`observe_batch` for one scan, flagged with the types in `flagged`."""
        flags = np.array([[t in flagged for t in ANOMALY_TYPES]], dtype=bool)
        return self.observe_batch(
            flags, np.array([confidence]), features[None, :], np.array([event_t]), model_version
        )

    def observe_batch(
        self,
        flags: np.ndarray,
        confidence: np.ndarray,
        features: np.ndarray,
        event_t: np.ndarray,
        model_version: str,
    ) -> list[DriftEvent]:
        """Feed everything a batch of scored scans says about drift; returns the fired events.

        `flags` is (scans, anomaly types), `confidence` each scan's top calibrated confidence,
        `features` the rows the model read, one per scan, in the order the scans were scored.
        """
        n = len(flags)
        if not n:
            return []
        was_flagged = flags.any(axis=1)
        normal = ~was_flagged
        finite = np.isfinite(confidence)
        rejected = normal & ~finite
        self.rejected += int(rejected.sum())
        self._tick(event_t[~rejected])
        events = self._feed(
            self.score, np.clip(confidence[normal & finite], 0.0, 1.0), model_version
        )

        moved = (features[:, _MOVED] > 0.5) & (features[:, _SAME_SITE] < 0.5)
        unknown = (features[moved][:, list(_UNKNOWN)] > 0.5).any(axis=1)
        events += self._feed(self.unknown, unknown.astype(np.float64), model_version)
        hop = features[:, _HOP].astype(np.float64)
        normal_hop = moved & normal & (hop != 0.0) & np.isfinite(hop)
        events += self._feed(self.hops, (hop[normal_hop] + 5.0) / 10.0, model_version)

        for anomaly_type, watched in self.rates.items():
            bits = flags[:, ANOMALY_TYPES.index(anomaly_type)].astype(np.float64)
            events += self._feed(watched, bits, model_version)
        return events

    def _tick(self, event_t: np.ndarray) -> None:
        if not len(event_t):
            return
        self.seen += len(event_t)
        self.first_t = min(self.first_t, float(event_t.min()))
        self.last_t = max(self.last_t, float(event_t.max()))

    def _feed(self, watched: _Watched, values: np.ndarray, model_version: str) -> list[DriftEvent]:
        events = []
        for before, after in watched.feed(values, self.min_scans, self.min_effect):
            self.fired += 1
            now = time.monotonic()
            action = "none (within retrain cooldown)"
            if now - self.last_request >= self.cooldown_s:
                action = "retrain_requested"
                self.last_request = now
            events.append(
                DriftEvent(
                    drift_id=uuid.uuid4().hex,
                    monitor=watched.name,
                    statistic=watched.statistic,
                    mean_before=before,
                    mean_after=after,
                    scans_seen=self.seen,
                    event_time_from=_iso(self.first_t),
                    event_time_to=_iso(self.last_t),
                    detector_instance=self.instance,
                    model_version=model_version,
                    action=action,
                    detected_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
                )
            )
        return events

    def snapshot(self) -> dict[str, Any]:
        return {"seen": self.seen, "rejected": self.rejected, "fired": self.fired}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).isoformat() if math.isfinite(t) else ""
