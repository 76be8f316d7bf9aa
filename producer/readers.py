"""Reading scan files: the raw export (TSV or CSV, detected), with or without eventId, or JSONL.

Readers yield `(line_number, record)` for good rows and `(line_number, BadRow)` for rows that
cannot be read, so callers report bad rows by line instead of skipping them silently.
`read_frame` reads a delimited file column by column instead (for offline scoring): the same
rows, as a frame of text with each row's line number.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pa_compute
import pyarrow.csv as pa_csv

from detector.schema import EVENT_ID_FIELDS, RAW_COLUMNS

JSON_SUFFIXES = {".jsonl", ".ndjson", ".json"}
UTF8_BOM = b"\xef\xbb\xbf"
# Bytes that make a file irregular for `read_frame`: quotes and NULs.
IRREGULAR_MARKS = (b'"', b"\0")
BLANK_LINES = (b"\n\n", b"\n\r\n")


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
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a long field is a field, not an error
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


@dataclass
class ScanFrame:
    """The readable rows of a delimited scan file as text columns named by its header, each
    row's line number, and the rows that could not be read."""

    frame: pd.DataFrame
    lines: np.ndarray
    bad: list[tuple[int, str]]


def read_frame(path: Path) -> ScanFrame:
    """The rows `read_scans` yields for a delimited file, as one frame.

    A regular file (one record per line: no quotes, blank lines, NULs or lone carriage
    returns, every line as wide as the header) is parsed by Arrow's multi-threaded reader; any
    other file goes through the row reader, so both give the same rows and line numbers.
    """
    data = path.read_bytes()
    fast = _read_regular(data, len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0)
    if fast is not None:
        return fast
    rows = list(_read_delimited(path))
    good = [(n, r) for n, r in rows if not isinstance(r, BadRow)]
    header = list(good[0][1]) if good else []
    return ScanFrame(
        pd.DataFrame.from_records([r for _, r in good], columns=header),
        np.array([n for n, _ in good], dtype=np.int64),
        [(n, r.reason) for n, r in rows if isinstance(r, BadRow)],
    )


def _read_regular(data: bytes, start: int) -> ScanFrame | None:
    """`data` from `start` parsed column by column, or None if it is not regular (see
    `read_frame`)."""
    if any(data.find(mark, start) >= 0 for mark in IRREGULAR_MARKS) or (
        data.find(b"\r", start) >= 0 and _lone_carriage_return(data)
    ):
        return None
    end = data.find(b"\n", start)
    first = data[start : end if end >= 0 else len(data)].rstrip(b"\r").decode("utf-8", "replace")
    delimiter = _delimiter(first)
    names = [h.strip() for h in first.split(delimiter)]
    skip = 1
    if "epc_code" not in names:
        if len(names) not in (len(RAW_COLUMNS), len(RAW_COLUMNS) + 1):
            return None
        names = ([EVENT_ID_FIELDS[0]] if len(names) > len(RAW_COLUMNS) else []) + list(RAW_COLUMNS)
        skip = 0
    if len(set(names)) != len(names) or len(names) < 2:
        return None
    irregular: list[object] = []

    def note(row: object) -> str:
        irregular.append(row)
        return "skip"

    try:
        table = pa_csv.read_csv(
            pa.py_buffer(memoryview(data)[start:]),
            read_options=pa_csv.ReadOptions(column_names=names, skip_rows=skip),
            parse_options=pa_csv.ParseOptions(
                delimiter=delimiter,
                quote_char=False,
                ignore_empty_lines=False,  # a blank line becomes an empty row: see below
                invalid_row_handler=note,
            ),
            convert_options=pa_csv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.string()),
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid:  # not UTF-8, say: the row reader replaces what it cannot decode
        return None
    if irregular:
        return None  # a short or long line: the row reader reports it by its line number
    if "epc_code" in names and pa_compute.any(pa_compute.equal(table["epc_code"], "")).as_py():
        # Searching for blank lines is slow; only a row without an EPC may be one.
        if any(data.find(blank, start) >= 0 for blank in BLANK_LINES):
            return None
    return ScanFrame(
        table.to_pandas(types_mapper=pd.ArrowDtype),  # Arrow's strings as they are, no copy
        np.arange(skip + 1, skip + 1 + table.num_rows, dtype=np.int64),
        [],
    )


def _lone_carriage_return(data: bytes) -> bool:
    """Whether a CR stands alone (the row reader ends a line there, Arrow may not)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    ends = raw == ord("\r")
    return bool((ends[:-1] & (raw[1:] != ord("\n"))).any() or ends[-1])
