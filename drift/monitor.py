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
from river.drift.binary import HDDMA

from detector.features import FEATURE_NAMES

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


# The recent level of a statistic is an exponential average over about this many scans.
RECENT_SCANS = 1000


@dataclass
class _Watched:
    """One River detector over one statistic, with the level it is compared against.

    River says *when* a stream changed; the change is reported only if the recent level moved
    at least `min_effect` from the reference level (the level after warm-up or after the last
    report). Scan streams are not independent draws (a pallet's items share their hops), so a
    detector alone fires on differences too small to matter.
    """

    name: str
    statistic: str
    detector: Any
    seen: int = 0
    total: float = 0.0
    recent: float = 0.0
    reference: float | None = None
    pending: int = 0  # scans left to confirm a change River signalled


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
        self.score = _Watched("adwin", "normal_scan_max_confidence", drift.ADWIN(delta=self.delta))
        self.hops = _Watched("adwin", "normal_hop_time_over_bound", drift.ADWIN(delta=self.delta))
        self.unknown = _Watched("hddm_a", "share_of_moves_to_unknown_routes_or_sites", HDDMA())
        self.rates = {t: _Watched("hddm_a", f"alert_rate_{t}", HDDMA()) for t in LEARNED_TYPES}

    def update(self, score: float, event_t: float, model_version: str) -> DriftEvent | None:
        """Feed one normal scan's top confidence; returns a drift event if one fires."""
        if not math.isfinite(score):
            self.rejected += 1
            return None
        self._tick(event_t)
        return self._feed(self.score, min(1.0, max(0.0, score)), model_version)

    def observe(
        self,
        flagged: tuple[str, ...],
        confidence: float,
        features: np.ndarray,
        event_t: float,
        model_version: str,
    ) -> list[DriftEvent]:
        """Feed everything one scored scan says about drift; returns the events that fired."""
        events: list[DriftEvent | None] = []
        if not flagged:
            events.append(self.update(confidence, event_t, model_version))
        else:
            self._tick(event_t)
        moved = features[_MOVED] > 0.5 and features[_SAME_SITE] < 0.5
        if moved:
            unknown = float(any(features[i] > 0.5 for i in _UNKNOWN))
            events.append(self._feed(self.unknown, unknown, model_version))
            hop = float(features[_HOP])
            if not flagged and hop != 0.0 and math.isfinite(hop):
                events.append(self._feed(self.hops, (hop + 5.0) / 10.0, model_version))
        for anomaly_type, watched in self.rates.items():
            events.append(self._feed(watched, float(anomaly_type in flagged), model_version))
        return [e for e in events if e is not None]

    def _tick(self, event_t: float) -> None:
        self.seen += 1
        self.first_t = min(self.first_t, event_t)
        self.last_t = max(self.last_t, event_t)

    def _feed(self, watched: _Watched, value: float, model_version: str) -> DriftEvent | None:
        watched.detector.update(value)
        watched.seen += 1
        watched.total += value
        weight = max(1.0 / RECENT_SCANS, 1.0 / watched.seen)
        watched.recent += weight * (value - watched.recent)
        if watched.seen < self.min_scans:
            return None
        if watched.reference is None:
            watched.reference = watched.total / watched.seen
        if watched.detector.drift_detected:
            watched.pending = 3 * RECENT_SCANS
        if not watched.pending:
            return None
        watched.pending -= 1
        before = watched.reference
        if abs(watched.recent - before) < self.min_effect:
            return None
        watched.reference = watched.recent
        watched.pending = 0
        self.fired += 1
        now = time.monotonic()
        action = "none (within retrain cooldown)"
        if now - self.last_request >= self.cooldown_s:
            action = "retrain_requested"
            self.last_request = now
        return DriftEvent(
            drift_id=uuid.uuid4().hex,
            monitor=watched.name,
            statistic=watched.statistic,
            mean_before=float(before),
            mean_after=float(watched.recent),
            scans_seen=self.seen,
            event_time_from=_iso(self.first_t),
            event_time_to=_iso(self.last_t),
            detector_instance=self.instance,
            model_version=model_version,
            action=action,
            detected_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
        )

    def snapshot(self) -> dict[str, Any]:
        return {"seen": self.seen, "rejected": self.rejected, "fired": self.fired}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).isoformat() if math.isfinite(t) else ""
