"""Reading scan files: the raw export (TSV or CSV, detected), with or without eventId, or JSONL.

Readers yield `(line_number, record)` for good rows and `(line_number, BadRow)` for rows that
cannot be read, so callers report bad rows by line instead of skipping them silently.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from detector.schema import EVENT_ID_FIELDS, RAW_COLUMNS

JSON_SUFFIXES = {".jsonl", ".ndjson", ".json"}


@dataclass(frozen=True)
class BadRow:
    reason: str


def _delimiter(header: str) -> str:
    return "\t" if header.count("\t") >= header.count(",") else ","


def read_scans(path: Path) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    """Records of a scan file in file order, with 1-based line numbers."""
    if path.suffix.lower() in JSON_SUFFIXES:
        yield from _read_json_lines(path)
    else:
        yield from _read_delimited(path)


def _read_json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                yield number, BadRow(f"not JSON: {exc}")
                continue
            if isinstance(record, dict):
                yield number, record
            else:
                yield number, BadRow("a JSON line must be an object")


def _read_delimited(path: Path) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    with path.open("r", newline="", encoding="utf-8-sig", errors="replace") as handle:
        first = handle.readline()
        delimiter = _delimiter(first)
        header = next(csv.reader(io.StringIO(first), delimiter=delimiter), [])
        header = [h.strip() for h in header]
        start = 2
        if "epc_code" not in header:
            # No header line: the raw export's 18 columns, optionally with eventId in front.
            width = len(header)
            header = ([EVENT_ID_FIELDS[0]] if width == len(RAW_COLUMNS) + 1 else []) + list(
                RAW_COLUMNS
            )
            handle.seek(0)
            start = 1
        reader = csv.reader(handle, delimiter=delimiter)
        # A record's number is the physical line it starts on: a quoted field may span lines.
        ended = 0  # lines read by the reader so far
        for fields in reader:
            number, ended = start + ended, reader.line_num
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            if len(fields) != len(header):
                yield number, BadRow(f"expected {len(header)} columns, found {len(fields)}")
                continue
            yield number, dict(zip(header, fields, strict=True))
