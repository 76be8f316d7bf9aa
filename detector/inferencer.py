"""Scoring a batch of scans: windows, features, one LSTM step per round, calibrated verdicts.

A batch is split into rounds: round k holds the k-th scan of each EPC in the batch, so scans of
one EPC are applied in arrival order while each round is one forward pass. Most batches are one
round; a burst of scans of one EPC adds rounds, never a pass per scan. Only flagged scans cost
Python objects afterwards: verdicts, evidence and alerts are built for them alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import torch

from config import Settings
from detector.alert import Alert, Explanation, alert_id, explain, now_iso, severity_of
from detector.artifact import LoadedModel
from detector.features import Evidence, Featurized, Featurizer, Round
from detector.schema import ANOMALY_TYPES, STEP_TIER, Scan, ScanColumns
from detector.train import EXACT_TYPES
from detector.windows import WindowTable

TYPE_INDEX = {t: i for i, t in enumerate(ANOMALY_TYPES)}
_STEP_TIER = np.array(STEP_TIER, dtype=np.int8)
# Scans per LSTM step: a step's gates then stay in cache, which makes a pass over a whole
# file's EPCs (a round of scoring a file) three times faster than one step over all of them.
STEP_ROWS = 4096
RULE_NAMES = {
    "epcFake": "epc_structure",
    "epcDup": "read_elsewhere_within_dup_window",
    "jump": "hop_below_bound",
}


@dataclass(slots=True)
class Verdict:
    """What the detector concluded about one scan."""

    scan: Scan
    confidence: np.ndarray  # calibrated, one per anomaly type (a row of the batch's matrix)
    flagged: tuple[str, ...]
    evidence: Evidence


@dataclass(slots=True)
class ScoredBatch:
    """A featurized batch with its decisions: `flags` and calibrated `confidence` are
    (scans, anomaly types), in scan order."""

    featurized: Featurized
    flags: np.ndarray
    confidence: np.ndarray

    @property
    def scans(self) -> Sequence[Scan]:
        return self.featurized.scans

    @property
    def slots(self) -> np.ndarray:
        return self.featurized.slots

    @property
    def t(self) -> np.ndarray:
        return self.featurized.t

    @property
    def features(self) -> np.ndarray:
        return self.featurized.x

    def flagged_rows(self) -> np.ndarray:
        return np.flatnonzero(self.flags.any(axis=1))

    def types(self, i: int) -> tuple[str, ...]:
        return tuple(t for t, hit in zip(ANOMALY_TYPES, self.flags[i], strict=True) if hit)


class Inferencer:
    """Scores scans against their windows with one loaded model."""

    def __init__(self, model: LoadedModel, settings: Settings, rules_gate: bool = True) -> None:
        """`rules_gate=False` flags on the model's confidence alone (the LSTM-only ablation)."""
        self.model = model
        self.rules_gate = rules_gate
        self.settings = settings
        self.featurizer = Featurizer(model.reference, settings)
        self.hidden = model.net.hidden_size
        self.slopes = np.array([model.scalers[t].slope for t in ANOMALY_TYPES], np.float32)
        self.intercepts = np.array([model.scalers[t].intercept for t in ANOMALY_TYPES], np.float32)
        self.thresholds = np.array([model.thresholds[t] for t in ANOMALY_TYPES], np.float32)
        self.rule_confidence = np.array(
            [_rule_precision(model.meta, t) for t in ANOMALY_TYPES], np.float32
        )
        self.exact = np.array([_decided_by_rule(model.meta, t) for t in ANOMALY_TYPES])

    @property
    def version(self) -> str:
        return self.model.version

    def table(self, capacity: int = 1024, event_ids: bool = True) -> WindowTable:
        """An empty window table this inferencer can score against."""
        return self.featurizer.table(self.hidden, capacity, event_ids)

    def score(self, scans: Sequence[Scan], table: WindowTable) -> list[Verdict]:
        """A verdict for every scan, in order; windows are updated in place."""
        batch = self.score_batch(scans, table)
        evidence = [self.evidence(batch, i, table) for i in range(len(scans))]
        return [
            Verdict(scan, batch.confidence[i], batch.types(i), evidence[i])
            for i, scan in enumerate(scans)
        ]

    def score_batch(self, scans: Sequence[Scan], table: WindowTable) -> ScoredBatch:
        """Flags and confidences of `scans` in their order; windows are updated in place."""
        done = self.featurizer.batch(table, scans)
        n = len(scans)
        batch = ScoredBatch(
            done,
            np.zeros((n, len(ANOMALY_TYPES)), dtype=bool),
            np.zeros((n, len(ANOMALY_TYPES)), dtype=np.float32),
        )
        for rnd, members in zip(done.rounds, done.members, strict=True):
            batch.flags[members], batch.confidence[members] = self._decide(rnd, table)
        return batch

    def score_columns(
        self, scans: ScanColumns, progress: Callable[[int], object] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Flags and calibrated confidences of a whole input's scans (a file), in its order.

        Round k holds the k-th scan of every EPC in the input, so each round is one pass over
        up to one scan per EPC: the decisions of streaming the input batch by batch, in as many
        passes as the longest history has scans. A clone read also flags the read it pairs
        with; no window is evicted here, so that read is found by its place in the window.
        """
        n, dup = len(scans), TYPE_INDEX["epcDup"]
        flags = np.zeros((n, len(ANOMALY_TYPES)), dtype=bool)
        confidence = np.zeros((n, len(ANOMALY_TYPES)), dtype=np.float32)
        if not n:
            return flags, confidence
        table = self.table(capacity=len(scans.epcs), event_ids=False)
        by_epc = np.argsort(scans.epc, kind="stable")  # each EPC's scans together, in order
        per_epc = np.bincount(scans.epc, minlength=len(scans.epcs))
        start = np.cumsum(per_epc) - per_epc  # where each EPC's scans begin in `by_epc`
        occurrence = np.empty(n, dtype=np.int64)
        occurrence[by_epc] = np.arange(n) - np.repeat(start, per_epc)
        slot = table.open_many(scans.epcs, scans.t[by_epc[start]])[scans.epc]
        loc = np.array([table.sites.id(s) for s in scans.sites], dtype=np.int32)[scans.site]
        tier = _STEP_TIER[scans.step]
        eid = np.zeros(n, dtype="S1")  # partners are found by place, not by id

        clones: list[np.ndarray] = []
        partners: list[np.ndarray] = []

        def decided(k: int, members: np.ndarray, rnd: Round, step: Future) -> None:
            flags[members], confidence[members] = step.result()
            cloned = np.flatnonzero(flags[members, dup])
            if len(cloned):
                rows = members[cloned]
                back = k - table.size + rnd.dup_column[cloned]  # the partner's occurrence
                clones.append(rows)
                partners.append(by_epc[start[scans.epc[rows]] + back])
            if progress is not None:
                progress(len(members))

        by_round = np.argsort(occurrence, kind="stable")
        ends = np.cumsum(np.bincount(occurrence))
        # The LSTM steps of round k need only round k's features, and the features of round
        # k + 1 need no LSTM state: a second thread steps one round while this one features
        # the next (torch and numpy release the GIL for the work).
        with ThreadPoolExecutor(max_workers=1) as lstm:
            previous = None
            for k, members in enumerate(np.split(by_round, ends[:-1])):
                rnd = self.featurizer.round(
                    table,
                    slot[members],
                    scans.t[members],
                    loc[members],
                    tier[members],
                    scans.etype[members],
                    eid[members],
                )
                step = lstm.submit(self._decide, rnd, table)
                if previous is not None:
                    decided(*previous)
                previous = (k, members, rnd, step)
            if previous is not None:
                decided(*previous)
        if clones:
            rows, other = np.concatenate(clones), np.concatenate(partners)
            flags[other, dup] = True
            np.maximum.at(confidence[:, dup], other, confidence[rows, dup])
        return flags, confidence

    def _decide(self, rnd: Round, table: WindowTable) -> tuple[np.ndarray, np.ndarray]:
        """One LSTM step for the round, carrying each window's state; calibrated decisions."""
        logits = np.empty((len(rnd.slots), len(ANOMALY_TYPES)), dtype=np.float32)
        for start in range(0, len(rnd.slots), STEP_ROWS):
            rows = slice(start, start + STEP_ROWS)
            logits[rows] = self._step(table, rnd.slots[rows], rnd.x[rows])

        z = np.clip(logits * self.slopes + self.intercepts, -40.0, 40.0)
        confidence = 1.0 / (1.0 + np.exp(-z))
        # A type is flagged only where its check found evidence: exact checks on that alone,
        # learned types only when the model also scores the scan past the type's threshold. A
        # model score without evidence (an input unlike anything in training) raises nothing.
        found = rnd.found
        if self.rules_gate:
            flags = found & (self.exact | (confidence >= self.thresholds))
            confidence = np.where(
                found & self.exact, np.maximum(confidence, self.rule_confidence), confidence
            )
        else:
            flags = confidence >= self.thresholds
        return flags, confidence.astype(np.float32, copy=False)

    def _step(self, table: WindowTable, slots: np.ndarray, x: np.ndarray) -> np.ndarray:
        """One LSTM step for one scan per slot, carrying each window's (h, c); the logits."""
        h = self.hidden
        state = table.hidden[slots]
        with torch.inference_mode():
            logits, h_next, c_next = self.model.net.step(
                torch.from_numpy(x),
                torch.from_numpy(np.ascontiguousarray(state[:, :h])),
                torch.from_numpy(np.ascontiguousarray(state[:, h:])),
            )
        table.hidden[slots, :h], table.hidden[slots, h:] = h_next.numpy(), c_next.numpy()
        return logits.numpy()

    def evidence(self, batch: ScoredBatch, i: int, table: WindowTable) -> Evidence:
        """The evidence behind every check that fired on scan `i` of a batch."""
        return self.featurizer.evidence_of(batch.featurized, i, table)

    def alerts(self, batch: ScoredBatch, i: int, table: WindowTable) -> list[Alert]:
        """Alerts for scan `i` of a batch; a clone also flags the earlier read it pairs with."""
        out: list[Alert] = []
        detected_at = now_iso()
        names = self.model.reference.site_names
        scan = batch.scans[i]
        evidence = self.evidence(batch, i, table)
        for anomaly_type in batch.types(i):
            confidence = float(batch.confidence[i, TYPE_INDEX[anomaly_type]])
            found = evidence.get(anomaly_type)
            out.append(
                self._alert(
                    scan.epc,
                    scan.event_id,
                    anomaly_type,
                    confidence,
                    scan.t,
                    scan.scan_location,
                    scan.location,
                    found,
                    detected_at,
                    names,
                )
            )
            if anomaly_type == "epcDup" and found:
                other, other_t, other_site = self.featurizer.other_read(batch.featurized, i, table)
                mirrored = dict(
                    found,
                    other_event_id=scan.event_id,
                    location=other_site,
                    other_location=scan.location,
                )
                out.append(
                    self._alert(
                        scan.epc,
                        other,
                        anomaly_type,
                        confidence,
                        other_t,
                        names.get(other_site, other_site),
                        other_site,
                        mirrored,
                        detected_at,
                        names,
                    )
                )
        return out

    def _alert(
        self,
        epc: str,
        event_id: str,
        anomaly_type: str,
        confidence: float,
        t: float,
        location_name: str,
        location_id: str,
        evidence: dict | None,
        detected_at: str,
        names: dict[str, str],
    ) -> Alert:
        settings = self.settings
        return Alert(
            alert_id=alert_id(event_id, anomaly_type, self.version),
            epc_code=epc,
            event_id=event_id,
            anomaly_type=anomaly_type,  # type: ignore[arg-type]
            confidence=round(confidence, 4),
            severity=severity_of(
                confidence, settings.severity_high_confidence, settings.severity_medium_confidence
            ),
            event_time=datetime.fromtimestamp(t, tz=UTC).isoformat(),
            location=location_name,
            location_id=location_id,
            detected_at=detected_at,
            model_version=self.version,
            explanation=Explanation(
                text=explain(anomaly_type, evidence, names),
                rule=(evidence or {}).get("problem") or RULE_NAMES.get(anomaly_type)
                if evidence
                else None,
                evidence=evidence or {},
                model_score=round(confidence, 4),
            ),
        )


def _rule_precision(meta: dict, anomaly_type: str) -> float:
    """Smoothed precision of a type's rule on the validation split: its confidence alone."""
    scores = meta.get("metrics", {}).get("per_type", {}).get(anomaly_type, {}).get("rules_only")
    if not scores:
        return 0.5
    return (scores["tp"] + 1.0) / (scores["tp"] + scores["fp"] + 2.0)


def _decided_by_rule(meta: dict, anomaly_type: str) -> bool:
    """Whether training found the rule alone at least as good as rule plus model for a type."""
    per_type = meta.get("metrics", {}).get("per_type", {}).get(anomaly_type, {})
    return per_type.get("decided_by", "rule" if anomaly_type in EXACT_TYPES else "") == "rule"
