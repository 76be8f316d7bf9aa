"""Scoring a batch of scans: windows, features, one LSTM step per round, calibrated verdicts.

A batch is split into rounds: round k holds the k-th scan of each EPC in the batch, so scans of
one EPC are applied in arrival order while each round is one forward pass. Most batches are one
round; a burst of scans of one EPC adds rounds, never a pass per scan.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import torch

from config import Settings
from detector.alert import Alert, Explanation, alert_id, explain, now_iso, severity_of
from detector.artifact import LoadedModel
from detector.features import N_FEATURES, EpcWindow, Evidence, Featurizer
from detector.schema import ANOMALY_TYPES, Scan
from detector.train import EXACT_TYPES

TYPE_INDEX = {t: i for i, t in enumerate(ANOMALY_TYPES)}
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
    """A batch's verdicts in scan order, and the matrices drift monitoring reads."""

    verdicts: list[Verdict]
    confidence: np.ndarray  # (scans, anomaly types), calibrated
    features: np.ndarray  # (scans, features): the rows the model read


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

    def score(self, scans: list[Scan], windows: MutableMapping[str, EpcWindow]) -> list[Verdict]:
        """Verdicts for `scans` in their order; windows are updated in place."""
        return self.score_batch(scans, windows).verdicts

    def score_batch(
        self, scans: list[Scan], windows: MutableMapping[str, EpcWindow]
    ) -> ScoredBatch:
        """`score`, with the batch's confidence and feature matrices in scan order."""
        rounds: list[list[int]] = []
        occurrences: dict[str, int] = {}
        for i, scan in enumerate(scans):
            k = occurrences.get(scan.epc, 0)
            occurrences[scan.epc] = k + 1
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(i)
        if len(rounds) == 1:  # no EPC twice in the batch: the round is the batch
            return self._round(scans, windows)
        n = len(scans)
        verdicts: list[Verdict | None] = [None] * n
        confidence = np.zeros((n, len(ANOMALY_TYPES)), dtype=np.float32)
        features = np.zeros((n, N_FEATURES), dtype=np.float32)
        for members in rounds:
            part = self._round([scans[i] for i in members], windows)
            for i, verdict in zip(members, part.verdicts, strict=True):
                verdicts[i] = verdict
            confidence[members] = part.confidence
            features[members] = part.features
        return ScoredBatch(verdicts, confidence, features)  # type: ignore[arg-type]

    def _round(self, scans: list[Scan], windows: MutableMapping[str, EpcWindow]) -> ScoredBatch:
        n = len(scans)
        x = np.empty((n, N_FEATURES), dtype=np.float32)
        evidence: list[Evidence] = []
        touched: list[EpcWindow] = []
        step = self.featurizer.step
        for j, scan in enumerate(scans):
            window = windows.get(scan.epc)
            if window is None:
                window = self.featurizer.new_window(scan)
            evidence.append(step(window, scan, x[j]))
            windows[scan.epc] = window
            touched.append(window)

        # Each window carries its LSTM state as float32 bytes (h then c): gathered and scattered
        # with one join and one slice per window.
        size = 2 * 4 * self.hidden
        blank = bytes(size)
        state = np.frombuffer(
            bytearray(b"".join([w.hidden or blank for w in touched])), dtype=np.float32
        ).reshape(n, 2, self.hidden)
        with torch.inference_mode():
            logits, h, c = self.model.net.step(
                torch.from_numpy(x), torch.from_numpy(state[:, 0]), torch.from_numpy(state[:, 1])
            )
        carried = np.stack([h.numpy(), c.numpy()], axis=1).tobytes()
        for j, window in enumerate(touched):
            window.hidden = carried[j * size : (j + 1) * size]

        z = np.clip(logits.numpy() * self.slopes + self.intercepts, -40.0, 40.0)
        confidence = 1.0 / (1.0 + np.exp(-z))
        # A type is flagged only where its check found evidence: exact checks on that alone,
        # learned types only when the model also scores the scan past the type's threshold. A
        # model score without evidence (an input unlike anything in training) raises nothing.
        evidence_found = np.zeros((n, len(ANOMALY_TYPES)), dtype=bool)
        for j, found in enumerate(evidence):
            for anomaly_type in found:  # most scans have none
                evidence_found[j, TYPE_INDEX[anomaly_type]] = True
        if self.rules_gate:
            flagged = evidence_found & (self.exact | (confidence >= self.thresholds))
            confidence = np.where(
                evidence_found & self.exact,
                np.maximum(confidence, self.rule_confidence),
                confidence,
            )
        else:
            flagged = confidence >= self.thresholds
        confidence = confidence.astype(np.float32, copy=False)
        return ScoredBatch(self._verdicts(scans, confidence, flagged, evidence), confidence, x)

    @staticmethod
    def _verdicts(
        scans: list[Scan],
        confidence: np.ndarray,
        flagged: np.ndarray,
        evidence: list[Evidence],
    ) -> list[Verdict]:
        types = [()] * len(scans)
        for j in np.flatnonzero(flagged.any(axis=1)).tolist():  # most scans are flagged nothing
            types[j] = tuple(t for t, hit in zip(ANOMALY_TYPES, flagged[j], strict=True) if hit)
        return list(map(Verdict, scans, confidence, types, evidence))

    def alerts(self, verdict: Verdict, windows: MutableMapping[str, EpcWindow]) -> list[Alert]:
        """Alerts for a verdict; a clone also flags the earlier read it pairs with."""
        out: list[Alert] = []
        detected_at = now_iso()
        names = self.model.reference.site_names
        scan = verdict.scan
        for anomaly_type in verdict.flagged:
            confidence = float(verdict.confidence[ANOMALY_TYPES.index(anomaly_type)])
            evidence = verdict.evidence.get(anomaly_type)
            out.append(
                self._alert(
                    scan.epc,
                    scan.event_id,
                    anomaly_type,
                    confidence,
                    scan.t,
                    scan.scan_location,
                    scan.location,
                    evidence,
                    detected_at,
                    names,
                )
            )
            if anomaly_type == "epcDup" and evidence:
                other = evidence["other_event_id"]
                window = windows.get(scan.epc)
                earlier = (
                    next((s for s in window.scans if s.event_id == other), None) if window else None
                )
                if earlier is not None:
                    mirrored = dict(
                        evidence,
                        other_event_id=scan.event_id,
                        location=earlier.location,
                        other_location=scan.location,
                    )
                    out.append(
                        self._alert(
                            scan.epc,
                            other,
                            anomaly_type,
                            confidence,
                            earlier.t,
                            names.get(earlier.location, earlier.location),
                            earlier.location,
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
