"""The alert document published on `anomaly-alerts`, and how a verdict becomes alerts.

`alert_id` is derived from event id, anomaly type and model version, so a replayed batch yields
the same ids and subscribers can drop repeats.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from detector.epc import DEFECT_WORDS
from detector.schema import ANOMALY_WORDS

SCHEMA_VERSION = 1
AnomalyType = Literal["epcFake", "epcDup", "locErr", "evtOrderErr", "jump"]
Severity = Literal["HIGH", "MEDIUM", "LOW"]


class Explanation(BaseModel):
    text: str = Field(description="one sentence for a person")
    rule: str | None = Field(description="the check that fired, or null if only the model did")
    evidence: dict[str, Any] = Field(description="expected vs observed quantities")
    model_score: float = Field(description="the LSTM's calibrated score for this type")


class Alert(BaseModel):
    """One alert per (scan event, anomaly type)."""

    schema_version: int = SCHEMA_VERSION
    alert_id: str
    epc_code: str
    event_id: str
    anomaly_type: AnomalyType
    confidence: float = Field(ge=0, le=1, description="calibrated: share of such alerts real")
    severity: Severity
    event_time: str
    location: str
    location_id: str
    detected_at: str
    model_version: str
    explanation: Explanation


def alert_id(event_id: str, anomaly_type: str, model_version: str) -> str:
    """Deterministic id of an alert.

    >>> alert_id("e1", "jump", "v1") == alert_id("e1", "jump", "v1")
    True
    """
    key = f"{event_id}|{anomaly_type}|{model_version}".encode()
    return hashlib.blake2b(key, digest_size=16).hexdigest()


def severity_of(confidence: float, high: float, medium: float) -> Severity:
    if confidence >= high:
        return "HIGH"
    return "MEDIUM" if confidence >= medium else "LOW"


def _minutes(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def explain(anomaly_type: str, evidence: dict[str, Any] | None, names: dict[str, str]) -> str:
    """One sentence saying why, from the rule evidence (or the model alone)."""
    if not evidence:
        return f"The model scores this scan as {ANOMALY_WORDS[anomaly_type]} though no rule fired."
    place = lambda site: names.get(site, site)  # noqa: E731
    if anomaly_type == "epcFake":
        return "EPC looks counterfeit: " + "; ".join(DEFECT_WORDS[d] for d in evidence["defects"])
    if anomaly_type == "epcDup":
        return (
            f"Same EPC read at {place(evidence['location'])} and "
            f"{place(evidence['other_location'])} {evidence['seconds_apart']:.0f} s apart "
            f"(one item cannot be in two places within {evidence['dup_window_s']:.0f} s)."
        )
    if anomaly_type == "jump":
        return (
            f"Hop {place(evidence['from'])} → {place(evidence['to'])} took "
            f"{_minutes(evidence['hop_s'])}; the route needs ≥ {_minutes(evidence['bound_s'])} "
            f"(bound from {evidence['bound_source']})."
        )
    if anomaly_type == "evtOrderErr":
        problem = evidence["problem"]
        if problem == "time_before_previous":
            return (
                f"Event time is {_minutes(evidence['seconds_earlier'])} earlier than the "
                f"previous scan ({evidence['previous_event_type']})."
            )
        if problem == "outbound_without_inbound":
            return f"Outbound at {place(evidence['site'])} with no inbound there before it."
        return (
            f"Inbound at a new site with no outbound from {place(evidence['previous_site'])} "
            f"(last scan there: {evidence['previous_event_type']})."
        )
    if evidence["problem"] == "step_regression":
        return (
            f"Item went back from a {evidence['from_tier']} ({place(evidence['from'])}) to a "
            f"{evidence['to_tier']} ({place(evidence['to'])})."
        )
    return (
        f"Route {place(evidence['from'])} → {place(evidence['to'])} is not one the network "
        f"uses (seen {evidence['route_shipments_seen']} times in history)."
    )


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
