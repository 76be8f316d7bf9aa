"""EPC structure checks: what makes a code impossible for a genuine item.

An EPC reads `header.company.product.lot.manufacture_date.serial`, six digit fields of lengths
3/7/7/6/8/9. Its structural defects never change, so they are computed once per EPC; the two
checks that depend on when the item was scanned (made after its first scan, or too old) use
event time, never the wall clock.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

EPC_PATTERN = re.compile(r"^(\d{3})\.(\d{7})\.(\d{7})\.(\d{6})\.(\d{8})\.(\d{9})$")
# The same pattern for Arrow (RE2) on ASCII codes, where `\d` is [0-9] in both; Python's `$`
# also matches before a final newline, RE2's does not.
EPC_FIELDS = r"^(?P<header>\d{3})\.(?P<company>\d{7})\.\d{7}\.\d{6}\.(?P<made>\d{8})\.\d{9}\n?$"
GENUINE_HEADER = "001"

STRUCTURE_DEFECTS: tuple[str, ...] = ("format", "header", "company", "manufacture_date")
TIME_DEFECTS: tuple[str, ...] = ("made_after_first_scan", "too_old")
DEFECT_WORDS: dict[str, str] = {
    "format": "the code is not six digit fields of lengths 3/7/7/6/8/9",
    "header": "the header is not 001",
    "company": "the company prefix is not registered",
    "manufacture_date": "the manufacture date is not a calendar date",
    "made_after_first_scan": "the manufacture date is later than the item's first scan",
    "too_old": "the manufacture date is older than the allowed age at scan time",
}


@dataclass(slots=True, frozen=True)
class EpcFacts:
    """What one EPC's code says about it: structural defects and its manufacture day."""

    company: str | None
    defects: tuple[str, ...]
    made_at: float | None  # epoch seconds of the manufacture day's start, UTC


@lru_cache(maxsize=65536)
def _day_start(yyyymmdd: str) -> float | None:
    """Epoch seconds of a YYYYMMDD day's start (UTC), or None if it is not a calendar date."""
    try:
        return datetime(
            int(yyyymmdd[:4]), int(yyyymmdd[4:6]), int(yyyymmdd[6:8]), tzinfo=UTC
        ).timestamp()
    except ValueError:
        return None


def company_of(code: str) -> str | None:
    """The company prefix of a well-formed code, else None.

    >>> company_of("001.8805843.3842332.100006.20250701.000008002")
    '8805843'
    >>> company_of("001.88058.3842332.100006.20250701.000008002") is None
    True
    """
    match = EPC_PATTERN.match(code)
    return match.group(2) if match else None


def inspect_epc(code: str, registered: frozenset[str]) -> EpcFacts:
    """Structural defects of `code` given the registered company prefixes.

    >>> inspect_epc("001.8805843.3842332.100006.20250701.000008002", frozenset({"8805843"}))
    EpcFacts(company='8805843', defects=(), made_at=1751328000.0)
    >>> inspect_epc("002.8805843.3842332.100006.20251301.000008002", frozenset()).defects
    ('header', 'company', 'manufacture_date')
    >>> inspect_epc("not-an-epc", frozenset()).defects
    ('format',)
    """
    match = EPC_PATTERN.match(code)
    if not match:
        return EpcFacts(company=None, defects=("format",), made_at=None)
    header, company, _product, _lot, made, _serial = match.groups()
    defects: list[str] = []
    if header != GENUINE_HEADER:
        defects.append("header")
    if company not in registered:
        defects.append("company")
    made_at = _day_start(made)
    if made_at is None:
        defects.append("manufacture_date")
    return _shared_facts(company, tuple(defects), made_at)


@lru_cache(maxsize=65536)
def _shared_facts(company: str, defects: tuple[str, ...], made_at: float | None) -> EpcFacts:
    """One `EpcFacts` per distinct value: the items of a lot share theirs (they are immutable)."""
    return EpcFacts(company=company, defects=defects, made_at=made_at)


def time_defects(
    facts: EpcFacts, first_scan_t: float, scan_t: float, max_age_days: float
) -> tuple[str, ...]:
    """Defects that need event time: made after its first scan, or older than allowed.

    The manufacture date is a day, so "after the first scan" means a later calendar day.

    >>> facts = inspect_epc("001.8805843.3842332.100006.20250701.000008002", frozenset())
    >>> time_defects(facts, first_scan_t=1751366709.0, scan_t=1751366709.0, max_age_days=365)
    ()
    >>> time_defects(facts, first_scan_t=1751200000.0, scan_t=1851366709.0, max_age_days=365)
    ('made_after_first_scan', 'too_old')
    """
    if facts.made_at is None:
        return ()
    found: list[str] = []
    if facts.made_at > first_scan_t - first_scan_t % 86400:
        found.append("made_after_first_scan")
    if scan_t - facts.made_at > max_age_days * 86400:
        found.append("too_old")
    return tuple(found)


def inspect_epcs(codes: Sequence[str], registered: frozenset[str]) -> tuple[np.ndarray, np.ndarray]:
    """`inspect_epc` for many codes at once, as arrays: which `STRUCTURE_DEFECTS` each code
    has (codes × defects) and its manufacture day (NaN for none).

    >>> defects, made_at = inspect_epcs(
    ...     ["001.8805843.3842332.100006.20250701.000008002", "x"], frozenset({"8805843"}))
    >>> defects.tolist(), made_at.tolist()[0]
    ([[False, False, False, False], [True, False, False, False]], 1751328000.0)
    """
    array = pa.array(codes, type=pa.string())
    parts = pc.extract_regex(array, EPC_FIELDS)
    valid = parts.is_valid()  # a code that does not match has empty fields
    header = pc.equal(parts.field("header"), GENUINE_HEADER)
    company = pc.is_in(parts.field("company"), value_set=pa.array(sorted(registered), pa.string()))
    made = pc.cast(pc.if_else(valid, parts.field("made"), "0"), pa.int64()).to_numpy()
    made_at = _day_starts(made // 10000, made // 100 % 100, made % 100)

    matched = valid.to_numpy(zero_copy_only=False)
    defects = np.zeros((len(codes), len(STRUCTURE_DEFECTS)), dtype=bool)
    defects[:, 0] = ~matched
    defects[:, 1] = matched & ~header.to_numpy(zero_copy_only=False)
    defects[:, 2] = matched & ~company.to_numpy(zero_copy_only=False)
    defects[:, 3] = matched & np.isnan(made_at)
    made_at[~matched] = np.nan
    # Python's `\d` takes digits of every script: those codes are inspected one by one.
    for i in np.flatnonzero(~pc.string_is_ascii(array).to_numpy(zero_copy_only=False)).tolist():
        facts = inspect_epc(codes[i], registered)
        defects[i] = [d in facts.defects for d in STRUCTURE_DEFECTS]
        made_at[i] = np.nan if facts.made_at is None else facts.made_at
    return defects, made_at


def _day_starts(year: np.ndarray, month: np.ndarray, day: np.ndarray) -> np.ndarray:
    """Epoch seconds of each day's start (UTC), NaN where it is not a calendar date."""
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    days_in = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])[np.clip(month, 0, 12)]
    days_in = days_in + (leap & (month == 2))
    valid = (year >= 1) & (month >= 1) & (month <= 12) & (day >= 1) & (day <= days_in)
    # Days from 1970-01-01 of a proleptic Gregorian date (the civil-from-days inverse).
    y = year - (month <= 2)
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (month + np.where(month > 2, -3, 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    seconds = ((era * 146097 + doe - 719468) * 86400).astype(np.float64)
    return np.where(valid, seconds, np.nan)
