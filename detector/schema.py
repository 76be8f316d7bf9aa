"""The scan-event contract: field names, vocabularies, and turning a record into a `Scan`.

A record is one scan event as a mapping of the raw export's field names to values (a decoded JSON
message or a file row). `to_scan` validates the required fields and returns a compact `Scan`, or
raises `InvalidScan` with a reason that names the field.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

RAW_COLUMNS: tuple[str, ...] = (
    "scan_location",
    "location_id",
    "hub_type",
    "business_step",
    "event_type",
    "operator_id",
    "device_id",
    "epc_code",
    "epc_header",
    "epc_company",
    "epc_product",
    "epc_lot",
    "epc_manufacture",
    "epc_serial",
    "product_name",
    "event_time",
    "manufacture_date",
    "expiry_date",
)
REQUIRED_FIELDS: tuple[str, ...] = ("epc_code", "event_time", "business_step", "event_type")
EVENT_ID_FIELDS: tuple[str, ...] = ("eventId", "event_id")

BUSINESS_STEPS: tuple[str, ...] = (
    "Factory",
    "WMS",
    "Logistics_HUB",
    "W_Stock_Inbound",
    "W_Stock_Outbound",
    "R_Stock_Inbound",
    "R_Stock_Outbound",
    "POS_Sell",
)
EVENT_TYPES: tuple[str, ...] = (
    "Aggregation",
    "WMS_Inbound",
    "WMS_Outbound",
    "HUB_Inbound",
    "HUB_Outbound",
    "W_Stock_Inbound",
    "W_Stock_Outbound",
    "R_Stock_Inbound",
    "R_Stock_Outbound",
    "POS_Sell",
)
ANOMALY_TYPES: tuple[str, ...] = ("epcFake", "epcDup", "locErr", "evtOrderErr", "jump")
ANOMALY_WORDS: dict[str, str] = {
    "epcFake": "counterfeit EPC",
    "epcDup": "cloned EPC",
    "locErr": "impossible location",
    "evtOrderErr": "broken process order",
    "jump": "impossible travel time",
}

STEP_INDEX = {name: i for i, name in enumerate(BUSINESS_STEPS)}
EVENT_INDEX = {name: i for i, name in enumerate(EVENT_TYPES)}

# The network's tiers, in journey order: factory, factory warehouse, hub, wholesaler, retailer.
STEP_TIER: tuple[int, ...] = (0, 1, 2, 3, 3, 4, 4, 4)
TIER_NAMES: tuple[str, ...] = ("factory", "warehouse", "hub", "wholesaler", "retailer")
INBOUND_EVENTS = frozenset(
    EVENT_INDEX[e] for e in ("WMS_Inbound", "HUB_Inbound", "W_Stock_Inbound", "R_Stock_Inbound")
)
# Aggregation hands an item from the factory floor onward, so it counts as leaving a site.
OUTBOUND_EVENTS = frozenset(
    EVENT_INDEX[e]
    for e in ("Aggregation", "WMS_Outbound", "HUB_Outbound", "W_Stock_Outbound", "R_Stock_Outbound")
)

# An event time in UTC as exports usually write it (ASCII digits, a valid clock).
USUAL_TIME = r"^\d{4}-\d{2}-\d{2} ([01]\d|2[0-3]):[0-5]\d:[0-5]\d$"
# A value that starts or ends with a character `str.strip` removes (U+3000 is the last one).
_SPACE = "[" + "".join(f"\\x{{{ord(c):x}}}" for c in map(chr, range(0x3001)) if c.isspace()) + "]"
PADDED = f"^{_SPACE}|{_SPACE}$"
# Event times outside this range cannot come from a scanner; they are bad input, not anomalies.
EARLIEST_EVENT_TIME = datetime(1990, 1, 1, tzinfo=UTC).timestamp()
LATEST_EVENT_TIME = datetime(2100, 1, 1, tzinfo=UTC).timestamp()


class InvalidScan(ValueError):
    """A record that is not a usable scan event; the message says which field and why."""


@dataclass(slots=True)
class Scan:
    """One validated scan event. `t` is event time in epoch seconds (UTC)."""

    event_id: str
    epc: str
    t: float
    location: str
    step: int
    etype: int
    event_time: str
    scan_location: str


def derive_event_id(epc: str, event_time: str, location: str, event_type: str) -> str:
    """A stable id for a scan that arrived without one, so replays keep the same id.

    >>> derive_event_id("001.8805843.3842332.100006.20250701.000008002",
    ...                 "2025-07-01 10:45:09", "12", "Aggregation")
    'ae9172f32835eb3f'
    """
    key = f"{epc}|{event_time}|{location}|{event_type}".encode()
    return hashlib.blake2b(key, digest_size=8).hexdigest()


@lru_cache(maxsize=16)
def _zone(name: str) -> tzinfo:
    return UTC if name.upper() == "UTC" else ZoneInfo(name)


@lru_cache(maxsize=1 << 16)
def parse_event_time(value: str, zone: str = "UTC") -> float:
    """ISO 8601 to epoch seconds; a time without an offset is read in `zone`.

    Cached: the items of a pallet share their timestamps, and a stream's times repeat.

    >>> parse_event_time("2025-07-01 10:45:09")
    1751366709.0
    >>> parse_event_time("2025-07-01T19:45:09+09:00")
    1751366709.0
    """
    text = value.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    # `fromisoformat` takes any character between date and time (a NUL or a letter too).
    if not text.isprintable() or (len(text) > 10 and text[4] == "-" and text[10] not in "Tt "):
        raise InvalidScan(f"event_time is not ISO 8601: {value!r}")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidScan(f"event_time is not ISO 8601: {value!r}") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_zone(zone))
    seconds = moment.timestamp()
    if not EARLIEST_EVENT_TIME <= seconds < LATEST_EVENT_TIME:
        raise InvalidScan(f"event_time is outside 1990..2100: {value!r}")
    return seconds


def _text(record: dict[str, Any], field: str) -> str:
    value = record.get(field)
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidScan(f"{field} must be a string, got {type(value).__name__}")
    if isinstance(value, float) and not (value.is_integer() and abs(value) < 2**53):
        # JSON numbers past 2**53 (or with a fraction) are not exact ids: 1e29 is not a site.
        raise InvalidScan(f"{field} must be a string, got the number {value!r}")
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def to_scan(record: dict[str, Any], zone: str = "UTC") -> Scan:
    """Validate a record and return its `Scan`; raises `InvalidScan` naming the field."""
    if not isinstance(record, dict):
        raise InvalidScan(f"a scan event must be a JSON object, got {type(record).__name__}")
    required: list[str] = []
    for field in REQUIRED_FIELDS:
        value = record.get(field)
        if value is not None and not isinstance(value, str):
            raise InvalidScan(f"{field} must be a string, got {type(value).__name__}")
        value = value.strip() if value else ""
        if not value:
            raise InvalidScan(f"missing required field {field}")
        required.append(value)
    epc, event_time, step_name, event_name = required
    location = _text(record, "location_id") or _text(record, "scan_location")
    if not location:
        raise InvalidScan("missing required field location_id (or scan_location)")

    step = STEP_INDEX.get(step_name)
    if step is None:
        raise InvalidScan(f"unknown business_step {step_name!r}")
    etype = EVENT_INDEX.get(event_name)
    if etype is None:
        raise InvalidScan(f"unknown event_type {event_name!r}")

    t = parse_event_time(event_time, zone)
    event_id = _text(record, "eventId") or _text(record, "event_id")
    if not event_id:
        event_id = derive_event_id(epc, event_time, location, event_name)
    return Scan(
        event_id=event_id,
        epc=epc,
        t=t,
        location=location,
        step=step,
        etype=etype,
        event_time=event_time,
        scan_location=_text(record, "scan_location") or location,
    )


@dataclass
class ScanColumns:
    """Validated scans as columns, in input order: what `Scan` holds, one array per field.

    `epc` and `site` index `epcs` and `sites` (each distinct value once); `row` is each scan's
    row in the input it came from.
    """

    row: np.ndarray
    epc: np.ndarray
    epcs: list[str]
    t: np.ndarray
    site: np.ndarray
    sites: list[str]
    step: np.ndarray
    etype: np.ndarray
    event_id: np.ndarray

    def __len__(self) -> int:
        return len(self.row)

    def take(self, keep: np.ndarray) -> ScanColumns:
        """The scans where `keep` is true, with names no kept scan uses (refused values of
        rows that went to `to_scan`) dropped."""
        epc, epcs = _renumber(self.epc[keep], self.epcs)
        site, sites = _renumber(self.site[keep], self.sites)
        return ScanColumns(
            row=self.row[keep],
            epc=epc,
            epcs=epcs,
            t=self.t[keep],
            site=site,
            sites=sites,
            step=self.step[keep],
            etype=self.etype[keep],
            event_id=self.event_id[keep],
        )

    @classmethod
    def of_scans(cls, scans: Sequence[Scan], rows: Sequence[int]) -> ScanColumns:
        epc, epcs = pd.factorize(pd.Series([s.epc for s in scans], dtype=object))
        site, sites = pd.factorize(pd.Series([s.location for s in scans], dtype=object))
        return cls(
            row=np.asarray(rows, dtype=np.int64),
            epc=epc.astype(np.int64),
            epcs=list(epcs),
            t=np.array([s.t for s in scans], dtype=np.float64),
            site=site.astype(np.int64),
            sites=list(sites),
            step=np.array([s.step for s in scans], dtype=np.int8),
            etype=np.array([s.etype for s in scans], dtype=np.int8),
            event_id=np.array([s.event_id for s in scans], dtype=object),
        )


def _renumber(codes: np.ndarray, names: list[Any]) -> tuple[np.ndarray, list[str]]:
    """`codes` into the names they use, in the order of `names`."""
    used = np.zeros(len(names), dtype=bool)
    used[codes] = True
    if used.all():
        return codes, names
    new = np.cumsum(used) - 1
    return new[codes], [name for name, kept in zip(names, used, strict=True) if kept]


def scan_columns(frame: pd.DataFrame, zone: str = "UTC") -> tuple[ScanColumns, dict[int, str]]:
    """`to_scan` over every row of a frame of text fields (a delimited file's rows), by column.

    Each distinct value of a field is checked once. A row whose fields are all plain (already
    stripped, known, parseable) is taken from those checks; any other row goes through
    `to_scan` itself, so both give the same scan or the same reason. Returns the valid rows'
    scans and the reason for each invalid row, by row.
    """
    n = len(frame)
    plain = np.ones(n, dtype=bool)

    def coded(field: str, check: Any) -> tuple[np.ndarray, list[Any]]:
        """Codes into the checked distinct values of `field` (`check` maps the list of them);
        rows failing the check are not plain. A missing column makes every row not plain."""
        if field not in frame:
            plain[:] = False
            return np.zeros(n, dtype=np.int64), [None]
        codes, distinct = pd.factorize(frame[field], use_na_sentinel=False)
        values = check(np.asarray(distinct, dtype=object).tolist())
        plain[:] &= np.array([v is not None for v in values], dtype=bool)[codes]
        return codes, values

    def each(check: Any) -> Any:
        return lambda values: [check(value) for value in values]

    epc, epcs = coded("epc_code", each(_plain_text))
    time_code, times = coded("event_time", lambda values: _plain_times(values, zone))
    step_code, steps = coded("business_step", each(STEP_INDEX.get))  # a known name is plain
    etype_code, etypes = coded("event_type", each(EVENT_INDEX.get))
    site, sites = coded("location_id", each(_plain_text))
    event_id = _event_ids(frame)
    columns = ScanColumns(
        row=np.arange(n, dtype=np.int64),
        epc=epc.astype(np.int64),
        epcs=epcs,
        t=np.array([v or 0.0 for v in times], dtype=np.float64)[time_code],
        site=site.astype(np.int64),
        sites=sites,
        step=np.array([-1 if v is None else v for v in steps], dtype=np.int8)[step_code],
        etype=np.array([-1 if v is None else v for v in etypes], dtype=np.int8)[etype_code],
        event_id=event_id,
    )
    return _settle_rows(frame, columns, plain, zone)


def _plain_text(value: Any) -> str | None:
    """A field value that needs no stripping and is not empty, else None."""
    return value if isinstance(value, str) and value and value == value.strip() else None


def _plain_times(values: list[Any], zone: str) -> list[float | None]:
    """`_plain_time` of each value; UTC times written `YYYY-MM-DD HH:MM:SS` (an export's usual
    layout) are parsed together, any other one by `parse_event_time`."""
    out: list[float | None] = [None] * len(values)
    usual = np.zeros(len(values), dtype=bool)
    if zone.upper() == "UTC" and values and all(isinstance(v, str) for v in values):
        found = pc.match_substring_regex(pa.array(values, pa.string()), USUAL_TIME)
        usual = found.to_numpy(zero_copy_only=False)
        try:
            stamps = np.array(np.array(values, dtype=object)[usual].astype(str), "datetime64[s]")
        except ValueError:  # a day the month does not have: each value alone says which
            usual[:] = False
        else:
            seconds = stamps.astype(np.int64).astype(np.float64)
            inside = (seconds >= EARLIEST_EVENT_TIME) & (seconds < LATEST_EVENT_TIME)
            rows = np.flatnonzero(usual)[inside].tolist()
            for i, value in zip(rows, seconds[inside].tolist(), strict=True):
                out[i] = value
    for i in np.flatnonzero(~usual).tolist():
        out[i] = _plain_time(values[i], zone)
    return out


def _plain_time(value: Any, zone: str) -> float | None:
    if not _plain_text(value):
        return None
    try:
        return parse_event_time(value, zone)
    except InvalidScan:
        return None


def _event_ids(frame: pd.DataFrame) -> np.ndarray:
    """Each row's given event id (stripped), or "" where it has none."""
    ids = np.full(len(frame), "", dtype=object)
    for field in reversed(EVENT_ID_FIELDS):  # the first field wins where both are set
        if field in frame:
            given = frame[field].to_numpy(dtype=object)
            padded = np.flatnonzero(_padded(frame[field]))
            given[padded] = [v.strip() for v in given[padded]]
            ids = np.where(given != "", given, ids)
    return ids


def _padded(column: pd.Series) -> np.ndarray:
    """Which values of a text column `str.strip` would change."""
    if isinstance(column.dtype, pd.ArrowDtype):
        found = pc.match_substring_regex(pa.array(column.array), PADDED)
        return found.to_numpy(zero_copy_only=False)
    return np.array([v != v.strip() for v in column.tolist()], dtype=bool)


def _settle_rows(
    frame: pd.DataFrame, columns: ScanColumns, plain: np.ndarray, zone: str
) -> tuple[ScanColumns, dict[int, str]]:
    """Rows that are not plain through `to_scan`; derived event ids where none was given."""
    invalid: dict[int, str] = {}
    others = np.flatnonzero(~plain)
    if len(others):
        epcs, sites = _Names(columns.epcs), _Names(columns.sites)
        for i, record in zip(others.tolist(), frame.iloc[others].to_dict("records"), strict=True):
            try:
                scan = to_scan(record, zone)
            except InvalidScan as exc:
                invalid[i] = str(exc)
                continue
            columns.epc[i], columns.site[i] = epcs.code(scan.epc), sites.code(scan.location)
            columns.t[i], columns.step[i], columns.etype[i] = scan.t, scan.step, scan.etype
            columns.event_id[i] = scan.event_id

    missing = np.flatnonzero(plain & (columns.event_id == ""))
    for i in missing.tolist():
        columns.event_id[i] = derive_event_id(
            columns.epcs[columns.epc[i]],
            frame["event_time"].iat[i],
            columns.sites[columns.site[i]],
            EVENT_TYPES[columns.etype[i]],
        )
    keep = np.ones(len(columns), dtype=bool)
    keep[list(invalid)] = False
    return columns.take(keep), invalid


class _Names:
    """A list of distinct names (None where a checked value was refused) and their codes."""

    def __init__(self, names: list[str | None]) -> None:
        self.names = names
        self.index = {name: i for i, name in enumerate(names) if name is not None}

    def code(self, name: str) -> int:
        found = self.index.get(name)
        if found is None:
            found = self.index[name] = len(self.names)
            self.names.append(name)
        return found
