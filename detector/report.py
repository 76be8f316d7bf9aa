"""Offline scoring of a scan file: the stream's inferencer, a per-row report, a summary."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from config import Settings
from detector.artifact import LoadedModel
from detector.features import EpcWindow
from detector.inferencer import Inferencer
from detector.schema import ANOMALY_TYPES, InvalidScan, to_scan

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


def score_records(
    rows: Iterable[tuple[int, dict[str, Any] | Any]],
    model: LoadedModel,
    settings: Settings,
    show_progress: bool = True,
) -> tuple[pd.DataFrame, ScoreSummary]:
    """Score `(line, record)` pairs in file order; bad rows are listed, not scored."""
    inferencer = Inferencer(model, settings)
    windows: dict[str, EpcWindow] = {}
    records: list[dict[str, Any]] = []
    invalid: list[tuple[int, str]] = []
    n_types = len(ANOMALY_TYPES)
    detected: list[np.ndarray] = []
    confidence: list[np.ndarray] = []
    row_of: dict[str, int] = {}
    pending = []
    bar = tqdm(desc="scoring", unit="scan", disable=not show_progress)

    def flush() -> None:
        verdicts = inferencer.score([s for s, _ in pending], windows)
        flags = np.zeros((len(verdicts), n_types), dtype=np.int8)
        conf = np.zeros((len(verdicts), n_types), dtype=np.float32)
        for j, verdict in enumerate(verdicts):
            conf[j] = verdict.confidence
            for anomaly_type in verdict.flagged:
                flags[j, ANOMALY_TYPES.index(anomaly_type)] = 1
        detected.append(flags)
        confidence.append(conf)
        dup = ANOMALY_TYPES.index("epcDup")
        for j, verdict in enumerate(verdicts):
            if "epcDup" in verdict.flagged and "epcDup" in verdict.evidence:
                other = row_of.get(verdict.evidence["epcDup"]["other_event_id"])
                if other is not None:
                    _mark(detected, confidence, other, dup, float(conf[j, dup]))
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
