"""Anomalies of the five types injected into clean journeys, with the labels they carry.

Real history has no labels, so training and evaluation inject known anomalies into it. Each
injection is one incident on one EPC and mimics how the anomaly happens in the field: a forged
code, a cloned tag read elsewhere, a shortcut in time, a skipped or back-dated step, an item
sent where its route cannot take it. Rows are raw-export dicts plus `_t` (event time, epoch s)
and `_arrival` (when the scan reached the system); arrival order is kept separate from event
time so back-dated scans stay visible.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from detector.epc import EPC_PATTERN
from detector.reference import Reference
from detector.schema import (
    ANOMALY_TYPES,
    BUSINESS_STEPS,
    EVENT_INDEX,
    INBOUND_EVENTS,
    OUTBOUND_EVENTS,
    STEP_INDEX,
    STEP_TIER,
    derive_event_id,
)

Row = dict[str, Any]
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
# Injection order: the types that need the longest journeys choose first.
INJECTION_ORDER = ("locErr", "jump", "evtOrderErr", "epcDup", "epcFake")
# Anomalies injected into an item whose journey is shorter than this have too little context.
MIN_JOURNEY_SCANS = 2


@dataclass
class Incident:
    """One injected anomaly: its type, how it was made, and the events that carry it."""

    incident_id: str
    anomaly_type: str
    variant: str
    epc: str
    rows: list[Row] = field(default_factory=list)


def format_time(t: float) -> str:
    return datetime.fromtimestamp(round(t), tz=UTC).strftime(TIME_FORMAT)


def set_time(row: Row, t: float) -> None:
    row["_t"] = float(round(t))
    row["event_time"] = format_time(t)


def location_of(row: Row) -> str:
    return str(row.get("location_id") or row.get("scan_location"))


def tier_of(row: Row) -> int:
    return STEP_TIER[STEP_INDEX[row["business_step"]]]


def etype_of(row: Row) -> int:
    return EVENT_INDEX[row["event_type"]]


def assign_event_ids(journeys: dict[str, list[Row]]) -> None:
    """Give every row lacking one the id a producer would derive from its content."""
    for rows in journeys.values():
        for row in rows:
            if not row.get("eventId"):
                row["eventId"] = derive_event_id(
                    row["epc_code"], row["event_time"], location_of(row), row["event_type"]
                )


class Injector:
    """Injects incidents into journeys (EPC → rows in arrival order) in place."""

    def __init__(
        self,
        reference: Reference,
        rng: random.Random,
        dup_window_s: float,
        max_age_days: int,
    ) -> None:
        self.ref = reference
        self.rng = rng
        self.dup_window_s = dup_window_s
        self.max_age_days = max_age_days
        self.sites_by_tier: dict[int, list[str]] = {}
        for site, tier in sorted(reference.site_tiers.items()):
            self.sites_by_tier.setdefault(tier, []).append(site)
        self._made = {
            "epcFake": self._fake,
            "epcDup": self._dup,
            "jump": self._jump,
            "evtOrderErr": self._order,
            "locErr": self._location,
        }

    def inject(
        self, journeys: dict[str, list[Row]], share: float, types: tuple[str, ...] = ANOMALY_TYPES
    ) -> list[Incident]:
        """Give about `share` of the EPCs one incident each, in equal numbers per type.

        The types that need the longest journeys are placed first, so every type gets its
        share even when most journeys are short.
        """
        candidates = [epc for epc, rows in journeys.items() if len(rows) >= MIN_JOURNEY_SCANS]
        self.rng.shuffle(candidates)
        per_type = max(1, int(round(share * len(journeys) / len(types))))
        used: set[str] = set()
        incidents: list[Incident] = []
        for anomaly_type in sorted(types, key=INJECTION_ORDER.index):
            made = 0
            for epc in candidates:
                if made >= per_type:
                    break
                if epc in used or epc not in journeys:
                    continue
                incident = self._made[anomaly_type](journeys, epc)
                if incident is None:
                    continue
                used.update((epc, incident.epc))
                incident.incident_id = f"inc-{len(incidents):06d}"
                incidents.append(incident)
                made += 1
        assign_event_ids(journeys)
        return incidents

    def _fake(self, journeys: dict[str, list[Row]], epc: str) -> Incident | None:
        match = EPC_PATTERN.match(epc)
        if not match:
            return None
        header, company, product, lot, made, serial = match.groups()
        first_t = min(r["_t"] for r in journeys[epc])
        variant = self.rng.choice(
            ["format", "header", "company", "manufacture_date", "made_after", "too_old"]
        )
        if variant == "format":
            code = f"{header}.{company}.{product}.{lot}.{made}.{serial[:-2]}"
        elif variant == "header":
            fake_header = self.rng.choice(["002", "100", "999"])
            code = f"{fake_header}.{company}.{product}.{lot}.{made}.{serial}"
        elif variant == "company":
            fresh = company
            while fresh == company or fresh in self.ref.registered_prefixes:
                fresh = f"{self.rng.randrange(10**7):07d}"
            code = f"{header}.{fresh}.{product}.{lot}.{made}.{serial}"
        elif variant == "manufacture_date":
            bad_day = self.rng.choice(["1332", "0230", "0631", "0000"])
            code = f"{header}.{company}.{product}.{lot}.{made[:4]}{bad_day}.{serial}"
        elif variant == "made_after":
            later = format_time(first_t + self.rng.randint(3, 90) * 86400)[:10].replace("-", "")
            code = f"{header}.{company}.{product}.{lot}.{later}.{serial}"
        else:
            age_days = self.max_age_days + self.rng.randint(60, 2000)
            older = format_time(first_t - age_days * 86400)[:10].replace("-", "")
            code = f"{header}.{company}.{product}.{lot}.{older}.{serial}"
        if code in journeys:
            return None
        rows = journeys.pop(epc)
        for row in rows:
            row["epc_code"] = code
        journeys[code] = rows
        return Incident("", "epcFake", variant, code, list(rows))

    def _dup(self, journeys: dict[str, list[Row]], epc: str) -> Incident | None:
        rows = journeys[epc]
        index = self.rng.randrange(len(rows))
        original = rows[index]
        tier = tier_of(original)
        others = [s for s in self.sites_by_tier.get(tier, []) if s != location_of(original)]
        if not others:
            return None
        clone = dict(original)
        site = self.rng.choice(others)
        clone["location_id"] = site
        clone["scan_location"] = self.ref.site_names.get(site, site)
        clone["eventId"] = f"{original['eventId']}-clone" if original.get("eventId") else ""
        gap = self.rng.uniform(1.0, 0.8 * self.dup_window_s)
        set_time(clone, original["_t"] + gap)
        clone["_arrival"] = original["_arrival"] + gap
        if index + 1 < len(rows) and rows[index + 1]["_arrival"] <= clone["_arrival"]:
            return None
        rows.insert(index + 1, clone)
        return Incident("", "epcDup", "clone_read_elsewhere", epc, [original, clone])

    def _jump(self, journeys: dict[str, list[Row]], epc: str) -> Incident | None:
        rows = journeys[epc]
        hops = []
        for i in range(1, len(rows)):
            a, b = rows[i - 1], rows[i]
            if location_of(a) == location_of(b) or b["_t"] <= a["_t"]:
                continue
            bound, _ = self.ref.hop_bound(location_of(a), location_of(b), tier_of(a), tier_of(b))
            if bound >= 4 * self.dup_window_s:
                hops.append((i, bound))
        if not hops:
            return None
        i, bound = self.rng.choice(hops)
        new_gap = max(2 * self.dup_window_s, self.rng.uniform(0.1, 0.6) * bound)
        shift = rows[i - 1]["_t"] + new_gap - rows[i]["_t"]
        # Event times move earlier; arrival stays, so the scans still reach the detector in the
        # same order (moving arrival too could overtake the previous scan of this EPC).
        for row in rows[i:]:
            set_time(row, row["_t"] + shift)
        return Incident("", "jump", "too_fast_hop", epc, [rows[i]])

    def _order(self, journeys: dict[str, list[Row]], epc: str) -> Incident | None:
        rows = journeys[epc]
        options = []
        for i in range(1, len(rows) - 1):
            here, after = rows[i], rows[i + 1]
            same_site = location_of(here) == location_of(after)
            if etype_of(here) in INBOUND_EVENTS and same_site:
                options.append(("skipped_inbound", i))
            if (
                etype_of(here) in OUTBOUND_EVENTS
                and not same_site
                and etype_of(after) in INBOUND_EVENTS
            ):
                options.append(("skipped_outbound", i))
        for i in range(1, len(rows)):
            if rows[i]["_t"] - rows[i - 1]["_t"] >= self.dup_window_s:
                options.append(("back_dated", i))
        if not options:
            return None
        variant, i = self.rng.choice(options)
        if variant == "back_dated":
            earlier, later = rows[i - 1], rows[i]
            t_earlier, t_later = earlier["_t"], later["_t"]
            set_time(earlier, t_later)
            set_time(later, t_earlier)
            return Incident("", "evtOrderErr", variant, epc, [later])
        del rows[i]
        return Incident("", "evtOrderErr", variant, epc, [rows[i]])

    def _location(self, journeys: dict[str, list[Row]], epc: str) -> Incident | None:
        rows = journeys[epc]
        options = []
        for i, row in enumerate(rows):
            if etype_of(row) in OUTBOUND_EVENTS and tier_of(row) >= 3:
                options.append(("step_regression", i))
            if i > 0 and row["event_type"] == "R_Stock_Inbound":
                options.append(("unsupplied_retailer", i))
        if not options:
            return None
        variant, i = self.rng.choice(options)
        if variant == "step_regression":
            return self._regress(journeys, epc, i)
        return self._misroute(journeys, epc, i)

    def _regress(self, journeys: dict[str, list[Row]], epc: str, i: int) -> Incident | None:
        rows = journeys[epc]
        last = rows[i]
        lower_tier = self.rng.choice([1, 2])
        sites = self.sites_by_tier.get(lower_tier, [])
        if not sites:
            return None
        site = self.rng.choice(sites)
        back = dict(last)
        back["location_id"] = site
        back["scan_location"] = self.ref.site_names.get(site, site)
        back["business_step"] = BUSINESS_STEPS[1] if lower_tier == 1 else BUSINESS_STEPS[2]
        back["event_type"] = "WMS_Inbound" if lower_tier == 1 else "HUB_Inbound"
        back["eventId"] = f"{last['eventId']}-return" if last.get("eventId") else ""
        bound, _ = self.ref.hop_bound(location_of(last), site, tier_of(last), lower_tier)
        gap = max(3 * bound, 6 * 3600.0) + self.rng.uniform(0, 12 * 3600.0)
        set_time(back, last["_t"] + gap)
        back["_arrival"] = last["_arrival"] + gap
        del rows[i + 1 :]
        rows.append(back)
        return Incident("", "locErr", "step_regression", epc, [back])

    def _misroute(self, journeys: dict[str, list[Row]], epc: str, i: int) -> Incident | None:
        rows = journeys[epc]
        before, arrival = rows[i - 1], rows[i]
        origin = location_of(before)
        retailers = [
            s
            for s in self.sites_by_tier.get(4, [])
            if s != location_of(arrival) and (origin, s) not in self.ref.route_support
        ]
        if not retailers:
            return None
        site = self.rng.choice(retailers)
        old_site = location_of(arrival)
        bound, _ = self.ref.hop_bound(origin, site, tier_of(before), 4)
        gap = arrival["_t"] - before["_t"]
        # Keep the real travel time when it is plausible for the new route; otherwise draw one.
        # A fixed multiple of the bound would teach the model a tell-tale hop time.
        wanted = gap if gap >= 1.5 * bound else bound * self.rng.uniform(1.5, 6.0)
        shift = wanted - gap
        for row in rows[i:]:
            if location_of(row) == old_site:
                row["location_id"] = site
                row["scan_location"] = self.ref.site_names.get(site, site)
            set_time(row, row["_t"] + shift)
            row["_arrival"] += shift
        return Incident("", "locErr", "unsupplied_retailer", epc, [arrival])
