"""EPC structure checks: what makes a code impossible for a genuine item.

An EPC reads `header.company.product.lot.manufacture_date.serial`, six digit fields of lengths
3/7/7/6/8/9. Its structural defects never change, so they are computed once per EPC; the two
checks that depend on when the item was scanned (made after its first scan, or too old) use
event time, never the wall clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache

EPC_PATTERN = re.compile(r"^(\d{3})\.(\d{7})\.(\d{7})\.(\d{6})\.(\d{8})\.(\d{9})$")
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
