"""The features of a round of scans in the context of their windows, and the rule evidence.

`Featurizer.round` is the single place where scans meet their EPCs' history: it computes the
feature rows the LSTM reads and the rule checks behind each anomaly type, then appends the
scans to their windows. A round holds at most one scan per EPC, so all of it is array work;
training, offline scoring and the streaming detector all go through it, and a model never sees
features computed two different ways. Evidence (the dictionaries alerts carry) is built only
for the scans that need it, from what the round kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from config import Settings
from detector.epc import STRUCTURE_DEFECTS, TIME_DEFECTS, company_of
from detector.reference import MEMO_MAX, Reference
from detector.schema import (
    ANOMALY_TYPES,
    EVENT_TYPES,
    INBOUND_EVENTS,
    OUTBOUND_EVENTS,
    STEP_TIER,
    TIER_NAMES,
    Scan,
)
from detector.windows import SiteTable, WindowTable

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


# A code's defects as bits: the structural ones (kept per window) then those of event time.
DEFECTS: tuple[str, ...] = (*STRUCTURE_DEFECTS, *TIME_DEFECTS)
_DEFECT_BIT = {name: 1 << i for i, name in enumerate(DEFECTS)}
_DEFECT_COLUMNS = tuple((_DEFECT_BIT[name], column) for name, column in _DEFECT_FEATURE.items())
_INBOUND = np.array([i in INBOUND_EVENTS for i in range(len(EVENT_TYPES))])
_OUTBOUND = np.array([i in OUTBOUND_EVENTS for i in range(len(EVENT_TYPES))])
_AGGREGATION = EVENT_TYPES.index("Aggregation")
# What broke the process order, and where the item cannot be, as codes of a round.
ORDER_PROBLEMS = (
    "",
    "time_before_previous",
    "outbound_without_inbound",
    "inbound_without_outbound",
)
PLACE_PROBLEMS = ("", "step_regression", "unknown_route")
BOUND_SOURCES = ("route", "step", "distance")
_TYPE = {t: i for i, t in enumerate(ANOMALY_TYPES)}
_STEP_TIER = np.array(STEP_TIER, dtype=np.int8)

Evidence = dict[str, dict[str, Any]]


@dataclass(slots=True)
class Round:
    """The scans of one round (at most one per EPC), their features, and their checks' findings.

    Arrays have one entry per scan. `found` says which types' checks found evidence; the rest
    is what that evidence is made of, valid where its check ran: the nearest read elsewhere
    (`dup_*`), the predecessor (`prev_*`, `dt`) where the move checks ran (`checked`), the
    move's reference facts (`hop`, an index into the featurizer's hop table, -1 for none), and
    the codes of `ORDER_PROBLEMS` and `PLACE_PROBLEMS`. `dup_column` is the window column that
    held the other read before the round appended its scans.
    """

    slots: np.ndarray
    t: np.ndarray
    loc: np.ndarray
    tier: np.ndarray
    etype: np.ndarray
    x: np.ndarray
    found: np.ndarray
    defects: np.ndarray
    dup: np.ndarray
    dup_t: np.ndarray
    dup_loc: np.ndarray
    dup_eid: np.ndarray
    dup_column: np.ndarray
    checked: np.ndarray
    prev_loc: np.ndarray
    prev_tier: np.ndarray
    prev_etype: np.ndarray
    dt: np.ndarray
    hop: np.ndarray
    order: np.ndarray
    place: np.ndarray


@dataclass(slots=True)
class Featurized:
    """The features of a batch of scans in their order, and the rounds they were computed in.

    Scan i was scan `position[i]` of round `round_of[i]`; `members[k]` lists round k's scans.
    """

    scans: Sequence[Scan]
    slots: np.ndarray
    t: np.ndarray
    x: np.ndarray
    found: np.ndarray
    rounds: list[Round]
    members: list[np.ndarray]
    round_of: np.ndarray
    position: np.ndarray

    def at(self, i: int) -> tuple[Round, int]:
        """Scan i's round and its place in it."""
        return self.rounds[self.round_of[i]], int(self.position[i])


class Featurizer:
    """Computes a round's feature rows and rule checks against its windows, then updates them."""

    def __init__(self, reference: Reference, settings: Settings) -> None:
        self.reference = reference
        self.window_scans = settings.window_scans
        self.dup_window_s = settings.dup_window_s
        self.max_age_s = settings.max_epc_age_days * 86400
        n = len(EVENT_TYPES)
        self._transition_known = np.zeros((n, n), dtype=bool)
        for a, b in reference.transitions:
            if 0 <= a < n and 0 <= b < n:
                self._transition_known[a, b] = True
        self._sites: SiteTable | None = None
        self._site_known = np.zeros(0, dtype=bool)
        self._reset_hops()

    def table(
        self, hidden_size: int = 0, capacity: int = 1024, event_ids: bool = True
    ) -> WindowTable:
        """An empty window table for this featurizer's settings and registered prefixes."""
        return WindowTable(
            self.window_scans,
            hidden_size,
            self.reference.registered_prefixes,
            capacity,
            event_ids,
        )

    def batch(self, table: WindowTable, scans: Sequence[Scan]) -> Featurized:
        """Features of `scans` in arrival order: round k holds the k-th scan of each EPC, so
        an EPC's scans meet its window one after another while each round is array work."""
        n = len(scans)
        table.compact_sites()  # made-up site ids cannot grow the site table without bound
        slots, occurrence = _slots(scans, table)
        sites = table.sites
        t = np.fromiter((s.t for s in scans), dtype=np.float64, count=n)
        loc = np.fromiter((sites.id(s.location) for s in scans), dtype=np.int32, count=n)
        tier = _STEP_TIER[np.fromiter((s.step for s in scans), dtype=np.int64, count=n)]
        etype = np.fromiter((s.etype for s in scans), dtype=np.int8, count=n)
        eid = table.event_id_bytes([s.event_id for s in scans])
        done = Featurized(
            scans=scans,
            slots=slots,
            t=t,
            x=np.zeros((n, N_FEATURES), dtype=np.float32),
            found=np.zeros((n, len(ANOMALY_TYPES)), dtype=bool),
            rounds=[],
            members=[],
            round_of=np.zeros(n, dtype=np.int32),
            position=np.zeros(n, dtype=np.int64),
        )
        rounds = int(occurrence.max()) + 1 if n else 0
        for k in range(rounds):
            members = np.flatnonzero(occurrence == k) if rounds > 1 else np.arange(n)
            rnd = self.round(
                table,
                slots[members],
                t[members],
                loc[members],
                tier[members],
                etype[members],
                eid[members],
            )
            done.x[members], done.found[members] = rnd.x, rnd.found
            done.round_of[members], done.position[members] = k, np.arange(len(members))
            done.rounds.append(rnd)
            done.members.append(members)
        return done

    def round(
        self,
        table: WindowTable,
        slots: np.ndarray,
        t: np.ndarray,
        loc: np.ndarray,
        tier: np.ndarray,
        etype: np.ndarray,
        eid: np.ndarray,
    ) -> Round:
        """Features and checks of one scan per slot in `slots`; appends the scans to windows."""
        self._follow_sites(table)
        n, size = len(slots), table.size
        x = np.zeros((n, N_FEATURES), dtype=np.float32)
        x[np.arange(n), etype] = 1.0
        x[:, _F["tier"]] = tier / 4.0
        count = table.count[slots].astype(np.int64)
        x[:, _F["scans_in_window"]] = count / self.window_scans
        x[:, _F["site_unknown"]] = ~self._site_known[loc]
        defects = self._defects(table, slots, t)
        for bit, column in _DEFECT_COLUMNS:
            x[:, column] = (defects & bit) != 0

        times, places = table.t[slots], table.loc[slots]
        held = np.arange(size) >= (size - count)[:, None]
        rnd = _blank_round(slots, t, loc, tier, etype, x, defects)
        self._dup_check(table, rnd, times, places, held)
        self._move_checks(table, rnd, times, places, held)

        rnd.found[:, _TYPE["epcFake"]] = defects != 0
        rnd.found[:, _TYPE["epcDup"]] = rnd.dup
        rnd.found[:, _TYPE["evtOrderErr"]] = rnd.order > 0
        rnd.found[:, _TYPE["locErr"]] = rnd.place > 0
        rnd.found[:, _TYPE["jump"]] = x[:, _F["hop_below_bound"]] > 0
        table.append(slots, t, loc, tier, etype, eid, rnd.dup)
        return rnd

    def _defects(self, table: WindowTable, slots: np.ndarray, t: np.ndarray) -> np.ndarray:
        """The code's structural defects plus those of event time, as bits of `DEFECTS`."""
        first = np.minimum(table.first_t[slots], t)
        table.first_t[slots] = first
        made = table.made_at[slots]
        with np.errstate(invalid="ignore"):  # NaN: no manufacture date, no time defects
            after = made > first - first % 86400  # made on a later day than the first scan
            too_old = t - made > self.max_age_s
        bits = after * _DEFECT_BIT["made_after_first_scan"] | too_old * _DEFECT_BIT["too_old"]
        return table.defects[slots] | bits.astype(np.uint8)

    def _dup_check(
        self,
        table: WindowTable,
        rnd: Round,
        times: np.ndarray,
        places: np.ndarray,
        held: np.ndarray,
    ) -> None:
        """Reads of the same EPC elsewhere within `dup_window_s`; the nearest one (the oldest
        of equally near ones) is the other read."""
        apart = np.abs(times - rnd.t[:, None])
        near = held & (places != rnd.loc[:, None]) & (apart <= self.dup_window_s)
        rnd.dup = near.any(axis=1)
        column = np.where(near, apart, np.inf).argmin(axis=1)
        rows = np.arange(len(rnd.t))
        rnd.dup_t, rnd.dup_loc = times[rows, column], places[rows, column]
        rnd.dup_eid = table.eid[rnd.slots, column]
        rnd.dup_column = column
        closest = apart[rows, column][rnd.dup]
        rnd.x[rnd.dup, _F["read_elsewhere_within_dup_window"]] = 1.0
        rnd.x[rnd.dup, _F["dup_closeness"]] = 1.0 - closest / self.dup_window_s

    def _move_checks(
        self,
        table: WindowTable,
        rnd: Round,
        times: np.ndarray,
        places: np.ndarray,
        held: np.ndarray,
    ) -> None:
        """Order, travel time and route checks against the predecessor: the latest scan that
        is not a clone read. A clone read itself is not checked as a move."""
        predecessors = held & ~table.side[rnd.slots]
        column = table.size - 1 - predecessors[:, ::-1].argmax(axis=1)
        rnd.checked = predecessors.any(axis=1) & ~rnd.dup
        r = np.flatnonzero(rnd.checked)
        if not len(r):
            return
        x, slots, c = rnd.x, rnd.slots[r], column[r]
        prev_t, prev_loc = times[r, c], places[r, c]
        prev_tier, prev_etype = table.tier[slots, c], table.etype[slots, c]
        rnd.prev_loc[r], rnd.prev_tier[r], rnd.prev_etype[r] = prev_loc, prev_tier, prev_etype
        loc, tier, etype = rnd.loc[r], rnd.tier[r], rnd.etype[r]
        dt = rnd.dt[r] = rnd.t[r] - prev_t
        x[r, _F["has_previous"]] = 1.0
        x[r, _F["signed_log_hours_since_previous"]] = np.copysign(np.log1p(np.abs(dt) / 3600), dt)
        x[r, _F["transition_unknown"]] = ~self._transition_known[prev_etype, etype]
        same = prev_loc == loc
        x[r, _F["same_site"]] = same

        earlier = dt < 0
        inbound_here = held[r] & (places[r] == loc[:, None]) & _INBOUND[table.etype[slots]]
        no_inbound = (
            ~earlier & _OUTBOUND[etype] & (etype != _AGGREGATION) & ~inbound_here.any(axis=1)
        )
        no_outbound = ~earlier & ~no_inbound & ~same & _INBOUND[etype] & ~_OUTBOUND[prev_etype]
        for code, problem in enumerate((earlier, no_inbound, no_outbound), start=1):
            rnd.order[r[problem]] = code
            x[r[problem], _F[ORDER_PROBLEMS[code]]] = 1.0

        moved = ~same
        m = r[moved]
        if not len(m):
            return
        hop = rnd.hop[m] = self._hop_rows(
            prev_loc[moved], loc[moved], prev_tier[moved], tier[moved]
        )
        x[m, _HOP_FEATURES] = self._hop_features[hop]
        bound, dt = self._hop_bound[hop], dt[moved]
        timed = (dt >= 0) & (bound > 0)
        ratio = np.log(np.maximum(dt[timed], 1.0) / bound[timed])
        x[m[timed], _F["log_hop_over_bound"]] = np.clip(ratio, -5.0, 5.0)
        x[m[timed & (dt < bound)], _F["hop_below_bound"]] = 1.0
        regression = tier[moved] < prev_tier[moved]
        unknown = ~regression & ~self._hop_known[hop]
        rnd.place[m[regression]], rnd.place[m[unknown]] = 1, 2
        x[m[regression], _F["tier_regression"]] = 1.0
        x[m[unknown], _F["route_unknown"]] = 1.0

    def _follow_sites(self, table: WindowTable) -> None:
        """Keep the per-site lookups in step with the table's site ids."""
        if table.sites is not self._sites:
            self._sites = table.sites
            self._site_known = np.zeros(0, dtype=bool)
            self._reset_hops()
        names = table.sites.names
        if len(self._site_known) < len(names):
            known = self.reference.site_tiers
            extra = [name in known for name in names[len(self._site_known) :]]
            self._site_known = np.concatenate([self._site_known, np.array(extra, dtype=bool)])

    def _reset_hops(self) -> None:
        self._hop_index: dict[int, int] = {}
        self._hop_bound = np.zeros(0)
        self._hop_source = np.zeros(0, dtype=np.int8)
        self._hop_shipments = np.zeros(0, dtype=np.int64)
        self._hop_origin = np.zeros(0, dtype=np.int64)
        self._hop_known = np.zeros(0, dtype=bool)
        self._hop_features = np.zeros((0, _HOP_FEATURES.stop - _HOP_FEATURES.start), np.float32)

    def _hop_rows(
        self,
        origin: np.ndarray,
        destination: np.ndarray,
        from_tier: np.ndarray,
        to_tier: np.ndarray,
    ) -> np.ndarray:
        """Rows of the hop table for each move, adding the moves not seen before (routes
        repeat all day, so a batch has few distinct moves)."""
        keys = (
            origin.astype(np.int64) << 34
            | destination.astype(np.int64) << 6
            | from_tier.astype(np.int64) << 3
            | to_tier.astype(np.int64)
        )
        distinct, inverse = np.unique(keys, return_inverse=True)
        if len(self._hop_index) + len(distinct) > MEMO_MAX:
            self._reset_hops()  # a stream of made-up site ids cannot grow it without bound
        index = self._hop_index
        rows = [index.get(key, -1) for key in distinct.tolist()]
        new = [key for key, row in zip(distinct.tolist(), rows, strict=True) if row < 0]
        if new:
            self._add_hops(new)
            rows = [index[key] for key in distinct.tolist()]
        return np.asarray(rows, dtype=np.int64)[inverse]

    def _add_hops(self, keys: list[int]) -> None:
        """What the reference says of each new move: bound, its source, route and origin
        shipments, whether the route is known, and the values of `_HOP_FEATURES`."""
        ref, names = self.reference, self._sites.names if self._sites is not None else []
        facts, features = [], []
        for key in keys:
            origin, destination = names[key >> 34], names[(key >> 6) & ((1 << 28) - 1)]
            move = (origin, destination, (key >> 3) & 7, key & 7)
            bound, source = ref.hop_bound(*move)
            shipments = ref.route_support.get((origin, destination), 0)
            from_origin = ref.origin_shipments(origin)
            ratio = ref.distance_ratio(*move)
            known = ref.route_known(origin, destination)
            facts.append((bound, BOUND_SOURCES.index(source), shipments, from_origin, known))
            features.append(
                (
                    math.log1p(bound / 3600.0),
                    math.log1p(shipments) / 5.0,
                    shipments / from_origin if from_origin else 0.0,
                    math.log1p(from_origin) / 5.0,
                    0.0 if ratio is None else max(-3.0, min(3.0, math.log(ratio + 1e-3))) / 3,
                )
            )
            self._hop_index[key] = len(self._hop_index)
        columns = list(zip(*facts, strict=True))
        self._hop_bound = np.append(self._hop_bound, np.array(columns[0], dtype=np.float64))
        self._hop_source = np.append(self._hop_source, np.array(columns[1], dtype=np.int8))
        self._hop_shipments = np.append(self._hop_shipments, np.array(columns[2], np.int64))
        self._hop_origin = np.append(self._hop_origin, np.array(columns[3], dtype=np.int64))
        self._hop_known = np.append(self._hop_known, np.array(columns[4], dtype=bool))
        self._hop_features = np.vstack([self._hop_features, np.array(features, np.float32)])

    def evidence_of(self, done: Featurized, i: int, table: WindowTable) -> Evidence:
        """The evidence behind every check that fired on scan `i` of a batch."""
        rnd, j = done.at(i)
        return self.evidence(rnd, j, table, done.scans[i].epc)

    @staticmethod
    def other_read(done: Featurized, i: int, table: WindowTable) -> tuple[str, float, str]:
        """The earlier read a clone read `i` pairs with: (event id, event time, site)."""
        rnd, j = done.at(i)
        return (
            table.event_id(bytes(rnd.dup_eid[j])),
            float(rnd.dup_t[j]),
            table.sites.names[int(rnd.dup_loc[j])],
        )

    def evidence(self, rnd: Round, j: int, table: WindowTable, epc: str) -> Evidence:
        """The evidence behind every check that fired on scan `j` of a round."""
        found: Evidence = {}
        names = table.sites.names
        here = names[int(rnd.loc[j])]
        defects = int(rnd.defects[j])
        if defects:
            fired = [name for name in DEFECTS if defects & _DEFECT_BIT[name]]
            found["epcFake"] = {"defects": fired, "company": company_of(epc)}
        if rnd.dup[j]:
            found["epcDup"] = {
                "other_event_id": table.event_id(bytes(rnd.dup_eid[j])),
                "other_location": names[int(rnd.dup_loc[j])],
                "location": here,
                "seconds_apart": round(abs(float(rnd.t[j] - rnd.dup_t[j])), 3),
                "dup_window_s": self.dup_window_s,
            }
        if not rnd.checked[j]:
            return found
        previous = names[int(rnd.prev_loc[j])]
        previous_type = EVENT_TYPES[int(rnd.prev_etype[j])]
        dt = float(rnd.dt[j])
        order = ORDER_PROBLEMS[int(rnd.order[j])]
        if order == "time_before_previous":
            found["evtOrderErr"] = {
                "problem": order,
                "previous_event_type": previous_type,
                "seconds_earlier": round(-dt, 3),
            }
        elif order == "outbound_without_inbound":
            found["evtOrderErr"] = {
                "problem": order,
                "site": here,
                "previous_event_type": previous_type,
            }
        elif order:
            found["evtOrderErr"] = {
                "problem": order,
                "previous_site": previous,
                "previous_event_type": previous_type,
            }
        hop = int(rnd.hop[j])
        if hop < 0:
            return found
        if rnd.found[j, _TYPE["jump"]]:
            found["jump"] = {
                "from": previous,
                "to": here,
                "hop_s": round(dt, 3),
                "bound_s": round(float(self._hop_bound[hop]), 3),
                "bound_source": BOUND_SOURCES[int(self._hop_source[hop])],
            }
        place = PLACE_PROBLEMS[int(rnd.place[j])]
        if place:
            ends = {
                "from": previous,
                "to": here,
                "from_tier": TIER_NAMES[int(rnd.prev_tier[j])],
                "to_tier": TIER_NAMES[int(rnd.tier[j])],
            }
            found["locErr"] = {"problem": place, **ends}
            if place == "unknown_route":
                found["locErr"]["route_shipments_seen"] = int(self._hop_shipments[hop])
                found["locErr"]["origin_shipments_seen"] = int(self._hop_origin[hop])
                regular = self.reference.regular_route_shipments(previous, here)
                if regular is not None:
                    # What the origin's regular routes to that tier carry, for comparison.
                    found["locErr"]["regular_route_shipments"] = regular
        return found


def _blank_round(
    slots: np.ndarray,
    t: np.ndarray,
    loc: np.ndarray,
    tier: np.ndarray,
    etype: np.ndarray,
    x: np.ndarray,
    defects: np.ndarray,
) -> Round:
    """A round before its clone and move checks ran: nothing found, nothing checked."""
    n = len(slots)
    return Round(
        slots=slots,
        t=t,
        loc=loc,
        tier=tier,
        etype=etype,
        x=x,
        found=np.zeros((n, len(ANOMALY_TYPES)), dtype=bool),
        defects=defects,
        dup=np.zeros(n, dtype=bool),
        dup_t=np.zeros(n),
        dup_loc=np.zeros(n, dtype=np.int32),
        dup_eid=np.zeros(n, dtype="S1"),
        dup_column=np.zeros(n, dtype=np.int64),
        checked=np.zeros(n, dtype=bool),
        prev_loc=np.zeros(n, dtype=np.int32),
        prev_tier=np.zeros(n, dtype=np.int8),
        prev_etype=np.zeros(n, dtype=np.int8),
        dt=np.zeros(n),
        hop=np.full(n, -1, dtype=np.int64),
        order=np.zeros(n, dtype=np.int8),
        place=np.zeros(n, dtype=np.int8),
    )


def _slots(scans: Sequence[Scan], table: WindowTable) -> tuple[np.ndarray, np.ndarray]:
    """Each scan's window slot (opening windows for new EPCs) and how many scans of its EPC
    came before it in the batch (its round)."""
    slot_of, open_window = table.slot_of, table.open
    slots = np.empty(len(scans), dtype=np.int64)
    occurrence = np.zeros(len(scans), dtype=np.int64)
    seen: dict[int, int] = {}
    for i, scan in enumerate(scans):
        slot = slot_of.get(scan.epc)
        if slot is None:
            slot = open_window(scan.epc, scan.t)
        slots[i] = slot
        k = seen.get(slot)
        if k is None:
            seen[slot] = 0
        else:
            seen[slot] = occurrence[i] = k + 1
    return slots, occurrence
