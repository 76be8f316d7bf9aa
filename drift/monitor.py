"""Watching the detector's own scores for drift with River.

The monitored stream is the top anomaly confidence of each scan judged normal: when the network
changes (a new hub, slower carriers) normal scans start to look less normal long before alerts
explode. Scores of flagged scans are never fed, so a burst of real anomalies is not drift; NaN
and inf are rejected before they reach ADWIN, which one NaN would disable for good.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel
from river import drift


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


@dataclass
class ScoreMonitor:
    """ADWIN over normal-scan scores with a warm-up and a retrain cooldown."""

    delta: float
    min_scans: int
    cooldown_s: float
    instance: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    rejected: int = 0
    seen: int = 0
    fired: int = 0

    def __post_init__(self) -> None:
        self.adwin = drift.ADWIN(delta=self.delta)
        self.first_t = math.inf
        self.last_t = -math.inf
        self.last_request = -math.inf

    def update(self, score: float, event_t: float, model_version: str) -> DriftEvent | None:
        if not math.isfinite(score):
            self.rejected += 1
            return None
        before = self.adwin.estimation
        self.adwin.update(min(1.0, max(0.0, score)))
        self.seen += 1
        self.first_t = min(self.first_t, event_t)
        self.last_t = max(self.last_t, event_t)
        if not self.adwin.drift_detected or self.seen < self.min_scans:
            return None
        self.fired += 1
        now = time.monotonic()
        action = "none (within retrain cooldown)"
        if now - self.last_request >= self.cooldown_s:
            action = "retrain_requested"
            self.last_request = now
        return DriftEvent(
            drift_id=uuid.uuid4().hex,
            monitor="adwin",
            statistic="normal_scan_max_confidence",
            mean_before=float(before),
            mean_after=float(self.adwin.estimation),
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
