"""Per-EPC windows and the features of one scan in the context of its window.

`Featurizer.step` is the single place where a scan meets its EPC's history: it computes the
feature row the LSTM reads, the rule evidence behind each anomaly type, and appends the scan to
the window. Training, offline scoring and the streaming detector all go through it, so a model
never sees features computed two different ways.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from config import Settings
from detector.epc import EpcFacts, inspect_epc, time_defects
from detector.reference import MEMO_MAX, Reference
from detector.schema import (
    EVENT_TYPES,
    INBOUND_EVENTS,
    OUTBOUND_EVENTS,
    STEP_TIER,
    TIER_NAMES,
    Scan,
)

FEATURE_NAMES: tuple[str, ...] = (
    *(f"event_{name}" for name in EVENT_TYPES),
    "tier",
    "has_previous",
    "same_site",
    "signed_log_hours_since_previous",
    "log_hop_over_bound",
    "hop_below_bound",
    "read_elsewhere_within_dup_window",
    "dup_closeness",
    "time_before_previous",
    "outbound_without_inbound",
    "inbound_without_outbound",
    "tier_regression",
    "route_unknown",
    "site_unknown",
    "transition_unknown",
    "epc_format",
    "epc_header",
    "epc_company",
    "epc_manufacture_date",
    "epc_made_after_first_scan",
    "epc_too_old",
    "scans_in_window",
    "log_bound_hours",
    "log_route_shipments",
    "route_share_of_origin",
    "log_origin_shipments",
    "log_distance_over_typical",
)
N_FEATURES = len(FEATURE_NAMES)
_F = {name: i for i, name in enumerate(FEATURE_NAMES)}
_DEFECT_FEATURE = {
    "format": _F["epc_format"],
    "header": _F["epc_header"],
    "company": _F["epc_company"],
    "manufacture_date": _F["epc_manufacture_date"],
    "made_after_first_scan": _F["epc_made_after_first_scan"],
    "too_old": _F["epc_too_old"],
}
# Features that are rule checks, per anomaly type: the "rules-only" detector reads these.
# The features of a move that depend only on its two ends (see `Featurizer._hop_facts`): a
# run of consecutive columns, written as one slice.
_HOP_FEATURES = slice(_F["log_bound_hours"], _F["log_distance_over_typical"] + 1)
assert FEATURE_NAMES[_HOP_FEATURES] == (
    "log_bound_hours",
    "log_route_shipments",
    "route_share_of_origin",
    "log_origin_shipments",
    "log_distance_over_typical",
)
RULE_FEATURES: dict[str, tuple[int, ...]] = {
    "epcFake": tuple(_DEFECT_FEATURE.values()),
    "epcDup": (_F["read_elsewhere_within_dup_window"],),
    "locErr": (_F["tier_regression"], _F["route_unknown"]),
    "evtOrderErr": (
        _F["time_before_previous"],
        _F["outbound_without_inbound"],
        _F["inbound_without_outbound"],
    ),
    "jump": (_F["hop_below_bound"],),
}


@dataclass(slots=True)
class WindowScan:
    """What a window keeps of a scan. `side` marks a clone read, never used as predecessor."""

    t: float
    location: str
    tier: int
    etype: int
    event_id: str
    side: bool


class EpcWindow:
    """The last scans of one EPC plus what the model carries between its scans.

    Millions of these are held at once, so a window is kept small: its scans in a tuple (the
    featurizer replaces it, keeping the last `window_scans`), the LSTM state as raw float32
    bytes, and the position (partition, offset) of the last scan applied, which the changelog
    and replay detection need.
    """

    __slots__ = ("scans", "first_t", "last_t", "facts", "hidden", "partition", "offset")

    def __init__(self, facts: EpcFacts, first_t: float) -> None:
        self.scans: tuple[WindowScan, ...] = ()
        self.first_t = first_t
        self.last_t = first_t
        self.facts = facts
        self.hidden: bytes | None = None  # LSTM (h, c) as float32 bytes, 2 x hidden values
        self.partition = -1  # -1: not applied from a partition (yet)
        self.offset = -1

    def predecessor(self) -> WindowScan | None:
        for scan in reversed(self.scans):
            if not scan.side:
                return scan
        return None


Evidence = dict[str, dict[str, Any]]


class Featurizer:
    """Computes a scan's feature row and rule evidence against its window, then updates it."""

    def __init__(self, reference: Reference, settings: Settings) -> None:
        self.reference = reference
        self.window_scans = settings.window_scans
        self.dup_window_s = settings.dup_window_s
        self.max_age_days = settings.max_epc_age_days
        self._hops: dict[tuple[str, str, int, int], tuple[Any, ...]] = {}

    def new_window(self, scan: Scan) -> EpcWindow:
        facts = inspect_epc(scan.epc, self.reference.registered_prefixes)
        return EpcWindow(facts, scan.t)

    def step(self, window: EpcWindow, scan: Scan, row: np.ndarray) -> Evidence:
        """Fill `row` with the scan's features, return rule evidence, append scan to window."""
        row[:] = 0.0
        evidence: Evidence = {}
        tier = STEP_TIER[scan.step]
        row[scan.etype] = 1.0
        row[_F["tier"]] = tier / 4.0
        row[_F["scans_in_window"]] = len(window.scans) / self.window_scans
        row[_F["site_unknown"]] = scan.location not in self.reference.site_tiers

        if scan.t < window.first_t:
            window.first_t = scan.t
        self._epc_checks(window, scan, row, evidence)
        clone_of = self._dup_check(window, scan, row, evidence)
        previous = window.predecessor()
        if previous is not None and clone_of is None:
            self._transition_checks(window, previous, scan, tier, row, evidence)

        location = sys.intern(scan.location)  # one string per site, not one per scan kept
        kept = WindowScan(scan.t, location, tier, scan.etype, scan.event_id, clone_of is not None)
        window.scans = (*window.scans, kept)[-self.window_scans :]
        if scan.t > window.last_t:
            window.last_t = scan.t
        return evidence

    def _epc_checks(
        self, window: EpcWindow, scan: Scan, row: np.ndarray, evidence: Evidence
    ) -> None:
        defects = window.facts.defects + time_defects(
            window.facts, window.first_t, scan.t, self.max_age_days
        )
        if defects:
            for defect in defects:
                row[_DEFECT_FEATURE[defect]] = 1.0
            evidence["epcFake"] = {"defects": list(defects), "company": window.facts.company}

    def _dup_check(
        self, window: EpcWindow, scan: Scan, row: np.ndarray, evidence: Evidence
    ) -> WindowScan | None:
        nearest: WindowScan | None = None
        for other in window.scans:
            apart = abs(scan.t - other.t)
            if other.location != scan.location and apart <= self.dup_window_s:
                if nearest is None or apart < abs(scan.t - nearest.t):
                    nearest = other
        if nearest is None:
            return None
        apart = abs(scan.t - nearest.t)
        row[_F["read_elsewhere_within_dup_window"]] = 1.0
        row[_F["dup_closeness"]] = 1.0 - apart / self.dup_window_s
        evidence["epcDup"] = {
            "other_event_id": nearest.event_id,
            "other_location": nearest.location,
            "location": scan.location,
            "seconds_apart": round(apart, 3),
            "dup_window_s": self.dup_window_s,
        }
        return nearest

    def _hop_facts(
        self, origin: str, destination: str, origin_tier: int, destination_tier: int
    ) -> tuple[Any, ...]:
        """What the reference says of a move, memoised per move (routes repeat all day):
        (bound_s, bound source, route shipments, origin shipments, route known, the values of
        `_HOP_FEATURES`)."""
        key = (origin, destination, origin_tier, destination_tier)
        facts = self._hops.get(key)
        if facts is not None:
            return facts
        ref = self.reference
        bound, source = ref.hop_bound(*key)
        shipments = ref.route_support.get((origin, destination), 0)
        from_origin = ref.origin_shipments(origin)
        ratio = ref.distance_ratio(*key)
        features = np.array(
            [
                math.log1p(bound / 3600.0),
                math.log1p(shipments) / 5.0,
                shipments / from_origin if from_origin else 0.0,
                math.log1p(from_origin) / 5.0,
                0.0 if ratio is None else max(-3.0, min(3.0, math.log(ratio + 1e-3))) / 3,
            ],
            dtype=np.float32,
        )
        facts = (bound, source, shipments, from_origin, ref.route_known(origin, destination))
        if len(self._hops) >= MEMO_MAX:
            self._hops.clear()  # a stream of made-up site ids cannot grow it without bound
        self._hops[key] = facts = (*facts, features)
        return facts

    def _transition_checks(
        self,
        window: EpcWindow,
        previous: WindowScan,
        scan: Scan,
        tier: int,
        row: np.ndarray,
        evidence: Evidence,
    ) -> None:
        ref = self.reference
        row[_F["has_previous"]] = 1.0
        dt = scan.t - previous.t
        row[_F["signed_log_hours_since_previous"]] = math.copysign(math.log1p(abs(dt) / 3600.0), dt)
        row[_F["transition_unknown"]] = (previous.etype, scan.etype) not in ref.transitions
        same_site = previous.location == scan.location
        row[_F["same_site"]] = same_site

        if dt < 0:
            row[_F["time_before_previous"]] = 1.0
            evidence["evtOrderErr"] = {
                "problem": "time_before_previous",
                "previous_event_type": EVENT_TYPES[previous.etype],
                "seconds_earlier": round(-dt, 3),
            }
        elif (
            scan.etype in OUTBOUND_EVENTS
            and scan.etype != 0
            and not any(
                s.location == scan.location and s.etype in INBOUND_EVENTS for s in window.scans
            )
        ):
            row[_F["outbound_without_inbound"]] = 1.0
            evidence["evtOrderErr"] = {
                "problem": "outbound_without_inbound",
                "site": scan.location,
                "previous_event_type": EVENT_TYPES[previous.etype],
            }
        elif (
            not same_site and scan.etype in INBOUND_EVENTS and previous.etype not in OUTBOUND_EVENTS
        ):
            row[_F["inbound_without_outbound"]] = 1.0
            evidence["evtOrderErr"] = {
                "problem": "inbound_without_outbound",
                "previous_site": previous.location,
                "previous_event_type": EVENT_TYPES[previous.etype],
            }
        if same_site:
            return

        hop = self._hop_facts(previous.location, scan.location, previous.tier, tier)
        bound, source, shipments, from_origin, known = hop[:5]
        row[_HOP_FEATURES] = hop[5]
        if dt >= 0 and bound > 0:
            row[_F["log_hop_over_bound"]] = max(-5.0, min(5.0, math.log(max(dt, 1.0) / bound)))
            if dt < bound:
                row[_F["hop_below_bound"]] = 1.0
                evidence["jump"] = {
                    "from": previous.location,
                    "to": scan.location,
                    "hop_s": round(dt, 3),
                    "bound_s": round(bound, 3),
                    "bound_source": source,
                }
        if tier < previous.tier:
            row[_F["tier_regression"]] = 1.0
            evidence["locErr"] = {"problem": "step_regression", **_hop(previous, scan, tier)}
        elif not known:
            row[_F["route_unknown"]] = 1.0
            evidence["locErr"] = {
                "problem": "unknown_route",
                **_hop(previous, scan, tier),
                "route_shipments_seen": shipments,
                "origin_shipments_seen": from_origin,
            }
            regular = ref.regular_route_shipments(previous.location, scan.location)
            if regular is not None:
                # What the origin's regular routes to that tier carry, for comparison.
                evidence["locErr"]["regular_route_shipments"] = regular


def _hop(previous: WindowScan, scan: Scan, tier: int) -> dict[str, Any]:
    """The two ends of a move, for location evidence."""
    return {
        "from": previous.location,
        "to": scan.location,
        "from_tier": TIER_NAMES[previous.tier],
        "to_tier": TIER_NAMES[tier],
    }
