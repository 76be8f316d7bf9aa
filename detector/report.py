"""Offline scoring of a scan file: the stream's inferencer, a per-row report, a summary."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
from tqdm import tqdm

from config import Settings
from detector.artifact import LoadedModel
from detector.inferencer import Inferencer
from detector.schema import ANOMALY_TYPES, InvalidScan, Scan, ScanColumns, scan_columns, to_scan
from producer.readers import JSON_SUFFIXES, read_frame, read_scans

SCORE_BATCH = 5000
# Alert levels by share of items flagged: above each bound, that level.
ALERT_LEVELS = ((0.10, "HIGH"), (0.05, "MEDIUM"), (0.01, "LOW"))


@dataclass
class ScoreSummary:
    items: int
    events: int
    flagged_items: int
    per_type_items: dict[str, int]
    per_type_events: dict[str, int]
    invalid_rows: list[tuple[int, str]]

    @property
    def flagged_share(self) -> float:
        return self.flagged_items / self.items if self.items else 0.0

    @property
    def level(self) -> str:
        return alert_level(self.flagged_share)


def alert_level(share: float) -> str:
    """The alert level of a share of flagged items.

    >>> [alert_level(s) for s in (0.2, 0.07, 0.02, 0.001)]
    ['HIGH', 'MEDIUM', 'LOW', 'EXCELLENT']
    """
    for bound, level in ALERT_LEVELS:
        if share > bound:
            return level
    return "EXCELLENT"


def score_file(
    path: Path, model: LoadedModel, settings: Settings, show_progress: bool = True
) -> tuple[pd.DataFrame, ScoreSummary]:
    """Score a scan file; the report is its readable, valid rows in file order.

    A delimited file is read and validated column by column; JSON lines go record by record.
    """
    if path.suffix.lower() in JSON_SUFFIXES:
        return score_records(read_scans(path), model, settings, show_progress)
    return _score_delimited(path, model, settings, show_progress)


def _score_delimited(
    path: Path, model: LoadedModel, settings: Settings, show_progress: bool
) -> tuple[pd.DataFrame, ScoreSummary]:
    read = read_frame(path)
    scans, refused = scan_columns(read.frame, settings.site_timezone)
    invalid = sorted(read.bad + [(int(read.lines[row]), why) for row, why in refused.items()])
    frame = read.frame
    if refused:
        frame = frame.iloc[scans.row].reset_index(drop=True)
    frame["eventId"] = scans.event_id
    return _report(frame, scans, model, settings, invalid, show_progress)


def score_records(
    rows: Iterable[tuple[int, dict[str, Any] | Any]],
    model: LoadedModel,
    settings: Settings,
    show_progress: bool = True,
) -> tuple[pd.DataFrame, ScoreSummary]:
    """Score `(line, record)` pairs in file order; bad rows are listed, not scored."""
    records: list[dict[str, Any]] = []
    scans: list[Scan] = []
    invalid: list[tuple[int, str]] = []
    for number, record in rows:
        if not isinstance(record, dict):
            invalid.append((number, getattr(record, "reason", str(record))))
            continue
        try:
            scan = to_scan(record, settings.site_timezone)
        except InvalidScan as exc:
            invalid.append((number, str(exc)))
            continue
        records.append({**record, "eventId": scan.event_id})
        scans.append(scan)
    columns = ScanColumns.of_scans(scans, range(len(scans)))
    return _report(
        pd.DataFrame.from_records(records), columns, model, settings, invalid, show_progress
    )


def _report(
    frame: pd.DataFrame,
    scans: ScanColumns,
    model: LoadedModel,
    settings: Settings,
    invalid: list[tuple[int, str]],
    show_progress: bool,
) -> tuple[pd.DataFrame, ScoreSummary]:
    """The report: `frame` (one row per scan) with each type's flag and confidence added."""
    with tqdm(total=len(scans), desc="scoring", unit="scan", disable=not show_progress) as bar:
        flags, confidence = Inferencer(model, settings).score_columns(scans, bar.update)
    added = {}
    for i, anomaly_type in enumerate(ANOMALY_TYPES):
        added[f"{anomaly_type}_detected"] = flags[:, i].astype(np.int8)
        added[f"{anomaly_type}_confidence"] = np.round(confidence[:, i], 4)
    frame = pd.concat([frame, pd.DataFrame(added, index=frame.index)], axis=1)
    return frame, _summarise(scans, flags, invalid)


def _summarise(
    scans: ScanColumns, flags: np.ndarray, invalid: list[tuple[int, str]]
) -> ScoreSummary:
    per_item = np.zeros((len(scans.epcs), len(ANOMALY_TYPES)), dtype=bool)
    rows, types = np.nonzero(flags)
    per_item[scans.epc[rows], types] = True
    return ScoreSummary(
        items=len(scans.epcs),
        events=len(scans),
        flagged_items=int(per_item.any(axis=1).sum()),
        per_type_items={t: int(per_item[:, i].sum()) for i, t in enumerate(ANOMALY_TYPES)},
        per_type_events={t: int(flags[:, i].sum()) for i, t in enumerate(ANOMALY_TYPES)},
        invalid_rows=invalid,
    )


def write_report(frame: pd.DataFrame, path: Path) -> None:
    """The report as CSV, written by Arrow. Nothing is quoted unless some value needs it (a
    comma, quote or line break in it); then every text value is, as Arrow does. A frame Arrow
    cannot take (JSON input with nested or mixed-type values, repeated column names) is
    written by pandas."""
    try:
        table = pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowException, ValueError):
        frame.to_csv(path, index=False)
        return
    with path.open("w+b") as handle:
        for quoting, header_quoting in (("none", csv.QUOTE_MINIMAL), ("needed", csv.QUOTE_ALL)):
            header = io.StringIO()
            csv.writer(header, quoting=header_quoting, lineterminator="\n").writerow(frame.columns)
            handle.seek(0)
            handle.truncate()
            handle.write(header.getvalue().encode())
            options = pa_csv.WriteOptions(include_header=False, quoting_style=quoting)
            try:
                pa_csv.write_csv(table, handle, options)
                return
            except pa.ArrowInvalid:
                if quoting == "none":
                    continue  # a value needs quotes: write again, quoting
                break
    frame.to_csv(path, index=False)  # a column type Arrow's writer does not write
