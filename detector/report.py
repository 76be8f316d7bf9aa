"""Offline scoring of a scan file: the stream's inferencer, a per-row report, a summary."""

from __future__ import annotations

import gc
import multiprocessing
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from config import Settings
from detector.artifact import LoadedModel
from detector.inferencer import Inferencer
from detector.schema import ANOMALY_TYPES, InvalidScan, to_scan
from producer.readers import read_scans

SCORE_BATCH = 5000
# Files smaller than this are scored in one process: starting workers costs seconds.
PARALLEL_MIN_BYTES = 8 << 20
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
    path: Path,
    model: LoadedModel,
    settings: Settings,
    workers: int = 1,
    show_progress: bool = True,
) -> tuple[pd.DataFrame, ScoreSummary]:
    """Score a scan file, sharded by EPC over `workers` processes; the report is in file order.

    An EPC's scans only ever meet their own window, so shards by EPC score exactly what one
    process would. Each worker reads the whole file and scores its own EPCs (reading is cheap
    next to scoring); a file under `PARALLEL_MIN_BYTES` is scored in this process.
    """
    if workers <= 1 or path.stat().st_size < PARALLEL_MIN_BYTES:
        return score_records(read_scans(path), model, settings, show_progress)
    context = multiprocessing.get_context("spawn")  # torch and fork do not mix
    jobs = [(path, model.path, settings, shard, workers, show_progress) for shard in range(workers)]
    with context.Pool(workers) as pool:
        parts = pool.starmap(_score_shard, jobs)
    frame = pd.concat([part for part, _ in parts], ignore_index=True)
    frame = frame.sort_values("_line", kind="stable").drop(columns="_line")
    frame = frame.reset_index(drop=True)
    invalid = sorted(row for _, rows in parts for row in rows)
    return frame, _summarise(frame, invalid)


def _score_shard(
    path: Path, model_dir: Path, settings: Settings, shard: int, shards: int, show_progress: bool
) -> tuple[pd.DataFrame, list[tuple[int, str]]]:
    import torch

    from detector.artifact import load_model

    torch.set_num_threads(settings.torch_threads)
    rows = _rows_of_shard(read_scans(path), shard, shards)
    frame, summary = score_records(
        rows, load_model(model_dir), settings, show_progress and shard == 0, keep_lines=True
    )
    return frame, summary.invalid_rows


def _rows_of_shard(
    rows: Iterable[tuple[int, dict[str, Any] | Any]], shard: int, shards: int
) -> Iterator[tuple[int, dict[str, Any] | Any]]:
    """The rows whose EPC falls in `shard`; a row that is not a record belongs to shard 0."""
    for number, record in rows:
        if isinstance(record, dict):
            epc = record.get("epc_code")
            key = epc.strip() if isinstance(epc, str) else ""
            if zlib.crc32(key.encode()) % shards == shard:
                yield number, record
        elif shard == 0:
            yield number, record


def score_records(
    rows: Iterable[tuple[int, dict[str, Any] | Any]],
    model: LoadedModel,
    settings: Settings,
    show_progress: bool = True,
    keep_lines: bool = False,
) -> tuple[pd.DataFrame, ScoreSummary]:
    """Score `(line, record)` pairs in file order; bad rows are listed, not scored.

    With `keep_lines`, the frame has a `_line` column with each record's line number. While it
    runs, the cyclic collector skips full passes: windows and records are many long-lived
    objects without cycles, and full passes over them cost a fifth of the time.
    """
    thresholds = gc.get_threshold()
    gc.set_threshold(thresholds[0], thresholds[1], 1_000_000_000)
    try:
        return _score_records(rows, model, settings, show_progress, keep_lines)
    finally:
        gc.set_threshold(*thresholds)


def _score_records(
    rows: Iterable[tuple[int, dict[str, Any] | Any]],
    model: LoadedModel,
    settings: Settings,
    show_progress: bool,
    keep_lines: bool,
) -> tuple[pd.DataFrame, ScoreSummary]:
    inferencer = Inferencer(model, settings)
    table = inferencer.table()
    records: list[dict[str, Any]] = []
    invalid: list[tuple[int, str]] = []
    n_types = len(ANOMALY_TYPES)
    detected: list[np.ndarray] = []
    confidence: list[np.ndarray] = []
    row_of: dict[str, int] = {}
    lines: list[int] = []
    pending = []
    bar = tqdm(desc="scoring", unit="scan", disable=not show_progress)
    dup = ANOMALY_TYPES.index("epcDup")

    def flush() -> None:
        batch = inferencer.score_batch([s for s, _ in pending], table)
        detected.append(batch.flags.astype(np.int8))
        confidence.append(batch.confidence.copy())
        for j in np.flatnonzero(batch.flags[:, dup]).tolist():
            other_id, _, _ = inferencer.featurizer.other_read(batch.featurized, j, table)
            other = row_of.get(other_id)
            if other is not None:
                _mark(detected, confidence, other, dup, float(batch.confidence[j, dup]))
        bar.update(len(pending))
        pending.clear()

    for number, record in rows:
        if not isinstance(record, dict):
            invalid.append((number, getattr(record, "reason", str(record))))
            continue
        try:
            scan = to_scan(record, settings.site_timezone)
        except InvalidScan as exc:
            invalid.append((number, str(exc)))
            continue
        row_of[scan.event_id] = len(records)
        records.append({**record, "eventId": scan.event_id})
        lines.append(number)
        pending.append((scan, number))
        if len(pending) >= SCORE_BATCH:
            flush()
    if pending:
        flush()
    bar.close()

    frame = pd.DataFrame.from_records(records)
    flags = np.concatenate(detected) if detected else np.zeros((0, n_types), np.int8)
    conf = np.concatenate(confidence) if confidence else np.zeros((0, n_types), np.float32)
    for i, anomaly_type in enumerate(ANOMALY_TYPES):
        frame[f"{anomaly_type}_detected"] = flags[:, i]
        frame[f"{anomaly_type}_confidence"] = np.round(conf[:, i], 4)
    if keep_lines:
        frame["_line"] = np.array(lines, dtype=np.int64)
    return frame, _summarise(frame, invalid)


def _mark(detected: list, confidence: list, row: int, col: int, value: float) -> None:
    for flags, conf in zip(detected, confidence, strict=True):
        if row < len(flags):
            flags[row, col] = 1
            conf[row, col] = max(conf[row, col], value)
            return
        row -= len(flags)


def _summarise(frame: pd.DataFrame, invalid: list[tuple[int, str]]) -> ScoreSummary:
    if frame.empty:
        return ScoreSummary(
            0, 0, 0, {t: 0 for t in ANOMALY_TYPES}, {t: 0 for t in ANOMALY_TYPES}, invalid
        )
    columns = [f"{t}_detected" for t in ANOMALY_TYPES]
    per_item = frame.groupby("epc_code")[columns].max()
    return ScoreSummary(
        items=len(per_item),
        events=len(frame),
        flagged_items=int(per_item.any(axis=1).sum()),
        per_type_items={t: int(per_item[f"{t}_detected"].sum()) for t in ANOMALY_TYPES},
        per_type_events={t: int(frame[f"{t}_detected"].sum()) for t in ANOMALY_TYPES},
        invalid_rows=invalid,
    )
