"""Training without labels: learn the network, inject known anomalies, fit and calibrate the LSTM.

History has no labels, so the EPCs are split into training and validation sets (disjoint by
EPC), the reference network is learned from the training EPCs only (so validation meets routes
the way live traffic does: some legitimately rare ones unseen), anomalies of the five types are
injected into both sets, the LSTM is trained with early stopping on validation loss, and the
per-type confidences are calibrated and thresholded on validation.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import structlog
import torch
from tqdm import tqdm

from config import Settings
from detector.artifact import save_model
from detector.calibration import PlattScaler, fit_platt, reliability
from detector.features import FEATURE_NAMES, N_FEATURES, RULE_FEATURES, Featurizer
from detector.inject import Incident, Injector, Row
from detector.model import ScanLSTM
from detector.reference import learn_reference
from detector.schema import ANOMALY_TYPES, InvalidScan, Scan, to_scan

log = structlog.get_logger(__name__)

# Types whose rule is exact: decided by the rule, the model only adds confidence.
EXACT_TYPES = ("epcFake", "epcDup")
# Journeys longer than this are cut for training; real ones have at most 10 scans plus clones.
MAX_TRAIN_SCANS = 16


@dataclass
class Journeys:
    """Rows grouped by EPC in arrival order, plus how many input rows were unusable."""

    by_epc: dict[str, list[Row]]
    invalid: int


def group_journeys(records: Iterable[dict[str, Any]], zone: str = "UTC") -> Journeys:
    """Validate records and group them by EPC; arrival order is the records' order.

    Arrival is kept as a clock in seconds (the latest event time seen so far, nudged forward
    by a microsecond a record) so injected anomalies can move scans in time and keep order.
    """
    by_epc: dict[str, list[Row]] = {}
    invalid = 0
    clock = float("-inf")
    for record in records:
        try:
            scan = to_scan(record, zone)
        except InvalidScan:
            invalid += 1
            continue
        row = dict(record)
        clock = max(clock + 1e-6, scan.t)
        row.update(_t=scan.t, _arrival=clock, eventId=scan.event_id)
        row["location_id"] = scan.location
        by_epc.setdefault(scan.epc, []).append(row)
    return Journeys(by_epc, invalid)


def scan_frame(journeys: dict[str, list[Row]]) -> pd.DataFrame:
    """The frame `learn_reference` reads, in arrival order."""
    rows = sorted((r for j in journeys.values() for r in j), key=lambda r: r["_arrival"])
    scans = [to_scan(r) for r in rows]
    return pd.DataFrame(
        {
            "epc": [s.epc for s in scans],
            "t": [s.t for s in scans],
            "location": [s.location for s in scans],
            "step": [s.step for s in scans],
            "etype": [s.etype for s in scans],
            "scan_location": [s.scan_location for s in scans],
        }
    )


def detection_labels(incidents: list[Incident]) -> dict[str, set[str]]:
    """Event id → anomaly types the detector can see on that event as it arrives.

    A clone is only visible on the second of its two reads; the first read is flagged
    retroactively when the second arrives, so the model is taught the second.
    """
    labels: dict[str, set[str]] = {}
    for incident in incidents:
        rows = incident.rows
        if incident.anomaly_type == "epcDup":
            rows = [max(rows, key=lambda r: r["_arrival"])]
        for row in rows:
            labels.setdefault(row["eventId"], set()).add(incident.anomaly_type)
    return labels


@dataclass
class Tensors:
    x: np.ndarray  # (journeys, length, features)
    y: np.ndarray  # (journeys, length, types)
    mask: np.ndarray  # (journeys, length) bool


def featurize_journeys(
    journeys: dict[str, list[Row]], featurizer: Featurizer, labels: dict[str, set[str]]
) -> Tensors:
    """Run every journey through the same featurizer the detector uses."""
    n = len(journeys)
    x = np.zeros((n, MAX_TRAIN_SCANS, N_FEATURES), dtype=np.float32)
    y = np.zeros((n, MAX_TRAIN_SCANS, len(ANOMALY_TYPES)), dtype=np.float32)
    mask = np.zeros((n, MAX_TRAIN_SCANS), dtype=bool)
    type_index = {t: i for i, t in enumerate(ANOMALY_TYPES)}
    scans, journey, position = _journey_scans(journeys)
    done = featurizer.batch(featurizer.table(capacity=n), scans)
    x[journey, position] = done.x
    mask[journey, position] = True
    for i, scan in enumerate(scans):
        for anomaly_type in labels.get(scan.event_id, ()):
            y[journey[i], position[i], type_index[anomaly_type]] = 1.0
    return Tensors(x, y, mask)


def _journey_scans(
    journeys: dict[str, list[Row]], limit: int | None = MAX_TRAIN_SCANS
) -> tuple[list[Scan], np.ndarray, np.ndarray]:
    """The scans of every journey in arrival order (at most `limit` each), with the journey
    and the place in it of each."""
    scans: list[Scan] = []
    journey: list[int] = []
    position: list[int] = []
    for j, rows in enumerate(journeys.values()):
        ordered = sorted(rows, key=lambda r: r["_arrival"])[:limit]
        scans.extend(to_scan(row) for row in ordered)
        journey.extend([j] * len(ordered))
        position.extend(range(len(ordered)))
    return scans, np.array(journey, dtype=np.int64), np.array(position, dtype=np.int64)


def rule_flags(x: np.ndarray) -> np.ndarray:
    """The rules-only verdict per type from feature rows: (..., features) → (..., types)."""
    return np.stack(
        [(x[..., list(RULE_FEATURES[t])] > 0.5).any(axis=-1) for t in ANOMALY_TYPES], axis=-1
    )


# Rule checks that mark a history journey as suspect. An unknown route is not among them: the
# validation split meets legitimately rare routes the training split's network never showed.
SUSPECT_FEATURES = tuple(
    sorted(
        {i for columns in RULE_FEATURES.values() for i in columns}
        - {FEATURE_NAMES.index("route_unknown")}
    )
)


def drop_suspect_journeys(journeys: dict[str, list[Row]], featurizer: Featurizer) -> int:
    """Remove journeys a rule check flags; return how many went.

    History has no labels, so an anomaly already in it would be taught as normal and pull the
    model's confidence down on the very pattern the rule names. Such journeys are left out of
    training and calibration; the reference data still counts them (minimum support and low
    quantiles keep a few of them from becoming normal).
    """
    scans, journey, _ = _journey_scans(journeys, limit=None)
    done = featurizer.batch(featurizer.table(capacity=len(journeys)), scans)
    flagged = (done.x[:, list(SUSPECT_FEATURES)] > 0.5).any(axis=1)
    epcs = list(journeys)
    suspect = {epcs[j] for j in np.unique(journey[flagged]).tolist()}
    for epc in suspect:
        del journeys[epc]
    return len(suspect)


def _fit(net: ScanLSTM, train: Tensors, valid: Tensors, settings: Settings, show: bool) -> dict:
    torch.manual_seed(settings.seed)
    xt, yt, mt = (torch.from_numpy(a) for a in (train.x, train.y, train.mask))
    xv, yv, mv = (torch.from_numpy(a) for a in (valid.x, valid.y, valid.mask))
    positives = yt[mt].sum(0)
    negatives = mt.sum() - positives
    pos_weight = (negatives / positives.clamp(min=1)).clamp(1.0, 50.0)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight, reduction="none")
    optimiser = torch.optim.Adam(net.parameters(), lr=5e-3)

    def masked_loss(x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return (loss_fn(net(x), y).mean(-1) * m).sum() / m.sum().clamp(min=1)

    best, best_state, stale, history = float("inf"), None, 0, []
    bar = tqdm(range(settings.train_epochs_max), desc="training", unit="epoch", disable=not show)
    for epoch in bar:
        net.train()
        order = torch.randperm(len(xt))
        for start in range(0, len(xt), settings.train_batch_sequences):
            idx = order[start : start + settings.train_batch_sequences]
            optimiser.zero_grad()
            loss = masked_loss(xt[idx], yt[idx], mt[idx])
            loss.backward()
            optimiser.step()
        net.eval()
        with torch.no_grad():
            val_loss = float(masked_loss(xv, yv, mv))
        history.append(val_loss)
        bar.set_postfix(val_loss=f"{val_loss:.4f}")
        log.debug("train_epoch", epoch=epoch, val_loss=val_loss)
        if val_loss < best - 1e-5:
            best, stale = val_loss, 0
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
        else:
            stale += 1
            if stale >= settings.train_patience_epochs:
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return {"epochs": len(history), "val_loss": history, "best_val_loss": best}


def choose_threshold(confidence: np.ndarray, labels: np.ndarray) -> float:
    """The confidence cut with the best F1 on validation, from the middle of its plateau.

    Validation often scores perfectly over a wide range of cuts; the extreme ends of that range
    are the ones new data falls off (the strictest cut drops real cases scored 0.9).

    >>> choose_threshold(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1]))
    0.5
    """
    cuts = np.linspace(0.05, 0.95, 91)
    positives = float((labels > 0).sum())
    f1 = np.empty(len(cuts))
    for i, cut in enumerate(cuts):
        flagged = confidence >= cut
        tp = float((flagged & (labels > 0)).sum())
        f1[i] = 2 * tp / max(1.0, float(flagged.sum()) + positives)
    plateau = cuts[f1 >= f1.max() - 1e-9]
    return float(np.round(np.median(plateau), 2))


def _scores(flagged: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    tp = float((flagged & labels).sum())
    fp = float((flagged & ~labels).sum())
    fn = float((~flagged & labels).sum())
    precision = tp / max(1.0, tp + fp)
    recall = tp / max(1.0, tp + fn)
    f1 = 2 * precision * recall / max(1e-9, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def calibrate(
    net: ScanLSTM, valid: Tensors
) -> tuple[dict[str, PlattScaler], dict[str, float], dict[str, Any]]:
    """Per-type Platt scaling and thresholds on validation, and the metrics they give."""
    with torch.no_grad():
        logits = net(torch.from_numpy(valid.x)).numpy()[valid.mask]
    labels = valid.y[valid.mask] > 0.5
    rules = rule_flags(valid.x[valid.mask])
    scalers, thresholds, metrics = {}, {}, {"per_type": {}}
    for i, anomaly_type in enumerate(ANOMALY_TYPES):
        scaler = fit_platt(logits[:, i], labels[:, i].astype(float))
        confidence = scaler.apply(logits[:, i])
        # Decisions as the inferencer makes them: a rule's evidence is required, and for the
        # learned types the model's confidence must pass the cut chosen here as well.
        gated = np.where(rules[:, i], confidence, 0.0)
        cut = choose_threshold(gated, labels[:, i])
        rule_scores = _scores(rules[:, i], labels[:, i])
        gated_scores = _scores(rules[:, i] & (confidence >= cut), labels[:, i])
        # The model stays on a type's decision path only where it beats the rule alone on
        # validation; elsewhere the rule decides and the model only adds confidence.
        by_rule = anomaly_type in EXACT_TYPES or rule_scores["f1"] >= gated_scores["f1"]
        flagged = rules[:, i] if by_rule else rules[:, i] & (confidence >= cut)
        ece, table = reliability(confidence[flagged], labels[flagged, i].astype(float))
        scalers[anomaly_type], thresholds[anomaly_type] = scaler, cut
        metrics["per_type"][anomaly_type] = {
            "decided_by": "rule" if by_rule else "rule+model",
            "combined": _scores(flagged, labels[:, i]),
            "model_alone": _scores(
                confidence >= choose_threshold(confidence, labels[:, i]), labels[:, i]
            ),
            "rules_only": rule_scores,
            "threshold": cut,
            "ece_of_alerts": ece,
            "reliability": table,
        }
    metrics["validation_scans"] = int(valid.mask.sum())
    return scalers, thresholds, metrics


def _sample(journeys: dict[str, list[Row]], limit: int, rng: random.Random) -> dict[str, list[Row]]:
    """At most `limit` of the journeys, drawn at random."""
    if len(journeys) <= limit:
        return journeys
    return {epc: journeys[epc] for epc in rng.sample(sorted(journeys), limit)}


def train_model(
    records: Iterable[dict[str, Any]],
    settings: Settings,
    out_root: Path,
    locations: pd.DataFrame | None = None,
    show_progress: bool = True,
    masked_features: tuple[str, ...] = (),
) -> Path:
    """Train a model from history records and write it as `out_root/<version>`.

    `masked_features` names feature columns the LSTM never sees (zeroed before scaling, in
    training and at inference); the names are stored with the model.
    """
    unknown = [name for name in masked_features if name not in FEATURE_NAMES]
    if unknown:
        raise ValueError(f"unknown features to mask: {unknown}; known: {list(FEATURE_NAMES)}")
    started = time.monotonic()
    torch.set_num_threads(settings.torch_threads)
    journeys = group_journeys(records, settings.site_timezone)
    if len(journeys.by_epc) < 50:
        raise ValueError(
            f"history has only {len(journeys.by_epc)} EPCs; training needs a few thousand"
        )
    history_frame = scan_frame(journeys.by_epc)  # before anything is injected
    rng = random.Random(settings.seed)
    epcs = sorted(journeys.by_epc)
    rng.shuffle(epcs)
    n_valid = int(len(epcs) * settings.validation_share)
    valid_set = {e: journeys.by_epc[e] for e in epcs[:n_valid]}
    train_set = {e: journeys.by_epc[e] for e in epcs[n_valid:]}
    reference = learn_reference(scan_frame(train_set), settings, locations)
    scalars = {k: v for k, v in reference.stats.items() if not isinstance(v, dict)}
    log.info("reference_learned", **scalars, invalid_rows=journeys.invalid)
    # The network is learned from every journey; the LSTM needs a sample of journeys, not all
    # of them, which keeps training time bounded however long the history is.
    train_limit = max(1, int(settings.train_max_epcs * (1.0 - settings.validation_share)))
    train_set = _sample(train_set, train_limit, rng)
    valid_set = _sample(valid_set, max(1, settings.train_max_epcs - train_limit), rng)

    featurizer = Featurizer(reference, settings)
    suspects = {
        "train": drop_suspect_journeys(train_set, featurizer),
        "validation": drop_suspect_journeys(valid_set, featurizer),
    }
    log.info("suspect_history_dropped", **suspects)
    injector = Injector(reference, rng, settings.dup_window_s, settings.max_epc_age_days)
    train_incidents = injector.inject(train_set, settings.train_anomaly_share)
    valid_incidents = injector.inject(valid_set, settings.train_anomaly_share)
    train = featurize_journeys(train_set, featurizer, detection_labels(train_incidents))
    valid = featurize_journeys(valid_set, featurizer, detection_labels(valid_incidents))

    masked = tuple(FEATURE_NAMES.index(name) for name in masked_features)
    net = ScanLSTM(N_FEATURES, settings.lstm_hidden_size, masked)
    flat = train.x[train.mask]
    flat[:, list(masked)] = 0.0
    net.feature_mean.copy_(torch.from_numpy(flat.mean(0)))
    net.feature_scale.copy_(torch.from_numpy(np.maximum(flat.std(0), 1e-3)))
    fit = _fit(net, train, valid, settings, show_progress)
    scalers, thresholds, metrics = calibrate(net, valid)
    # Training and calibration needed a network learned without the validation EPCs; the
    # detector gets the network learned from all of history, which knows more rare routes.
    reference = learn_reference(history_frame, settings, locations)

    digest = hashlib.blake2b(digest_size=4)
    for tensor in net.state_dict().values():
        digest.update(tensor.numpy().tobytes())
    version = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{digest.hexdigest()}"
    training = {
        "history_scans": sum(len(r) for r in journeys.by_epc.values()),
        "history_epcs": len(journeys.by_epc),
        "invalid_rows": journeys.invalid,
        "train_epcs": len(train_set),
        "validation_epcs": len(valid_set),
        "train_max_epcs": settings.train_max_epcs,
        "suspect_epcs_dropped": suspects,
        "injected_incidents": {"train": len(train_incidents), "validation": len(valid_incidents)},
        "seconds": round(time.monotonic() - started, 1),
        **fit,
    }
    path = save_model(
        out_root / version,
        version,
        net,
        reference,
        scalers,
        thresholds,
        metrics,
        training,
        tuple(masked_features),
    )
    log.info("model_saved", path=str(path), version=version, seconds=training["seconds"])
    return path
