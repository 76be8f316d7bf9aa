"""The retrainer: drift events in, a candidate trained on recent history, promoted if not worse.

A retrain request on `drift-events` makes the worker read the last `retrain_history_s` of
`scan-events` by message timestamp, hold out a share of its EPCs, train a candidate on the rest,
inject anomalies of the five types into the held-out EPCs and score candidate and current model
on them. The candidate becomes `models/current` only when its macro-F1 is at most
`retrain_margin` below the current model's; either way the decision is published on
`topic_models` and the candidate stays on disk with its evaluation beside it.
"""

from __future__ import annotations

import heapq
import json
import math
import random
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson
import pandas as pd
import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from pydantic import BaseModel, ValidationError

from config import Settings
from detector.artifact import META_FILE, LoadedModel, ModelUnavailable, load_model, promote
from detector.inferencer import Inferencer
from detector.inject import Injector, Row
from detector.reference import learn_reference
from detector.schema import ANOMALY_TYPES, Scan, to_scan
from detector.train import detection_labels, group_journeys, scan_frame, train_model
from drift.monitor import DriftEvent
from producer.kafka import DeliveryTracker, make_producer

log = structlog.get_logger(__name__)

RETRAIN_ACTION = "retrain_requested"
EVALUATION_FILE = "evaluation.json"
# Training blocks the poll loop; the group must not evict the worker while a candidate trains,
# or the request would be handed out again and trained twice.
MAX_RETRAIN_MS = 3_600_000
HISTORY_READ_TIMEOUT_S = 120.0
DELIVERY_TIMEOUT_S = 30.0
# Fewer held-out EPCs than this give an F1 too noisy to decide on.
MIN_EVALUATION_EPCS = 50


class UpdateNotAcknowledged(RuntimeError):
    """A model decision was not acknowledged by the broker; its request stays uncommitted."""


class ModelUpdate(BaseModel):
    """A model decision as published on `topic_models`, keyed by the candidate's version."""

    schema_version: int = 1
    update_id: str
    decision: Literal["promoted", "rejected"]
    reason: str
    candidate_version: str | None
    current_version: str | None
    candidate_f1: float | None
    current_f1: float | None
    margin: float
    candidate_false_alarm_rate: float | None = None
    current_false_alarm_rate: float | None = None
    per_type_f1: dict[str, dict[str, float]] = {}
    history_scans: int = 0
    evaluation_scans: int = 0
    drift_id: str | None = None
    decided_at: str


@dataclass
class Evaluation:
    """How one model did on the held-out EPCs with injected anomalies."""

    macro_f1: float
    per_type_f1: dict[str, float]
    false_alarm_rate: float
    scans: int


@dataclass
class EvaluationSet:
    """Held-out scans in arrival order and the anomaly types each one carries."""

    scans: list[Scan]
    labels: dict[str, set[str]]


Trainer = Callable[[list[dict[str, Any]], Settings, Path, pd.DataFrame | None], Path]
Evaluator = Callable[[LoadedModel, EvaluationSet, Settings], Evaluation]


def retrainer_group(settings: Settings) -> str:
    """The retrainer's consumer group, derived from the detector's so test runs stay apart."""
    return f"{settings.group_id}-retrainer"


def read_recent_scans(settings: Settings, since_s: float) -> list[dict[str, Any]]:
    """Scan records on the scan topic from message time `since_s` to the current end.

    Partitions are merged by message timestamp while each partition keeps its own order, so
    every EPC's scans (one partition, keyed by EPC) stay in arrival order.
    """
    topic = settings.topic_scans
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"{retrainer_group(settings)}-history",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
        }
    )
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        wanted = [TopicPartition(topic, p, int(since_s * 1000)) for p in partitions]
        starts = consumer.offsets_for_times(wanted, timeout=10)
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        }
        assigned = [tp for tp in starts if 0 <= tp.offset < ends[tp.partition]]
        per_partition = _read_to_end(consumer, assigned, ends)
    finally:
        consumer.close()
    merged = heapq.merge(*per_partition.values(), key=lambda item: item[0])
    return [record for _, record in merged]


def _read_to_end(
    consumer: Consumer, assigned: list[TopicPartition], ends: dict[int, int]
) -> dict[int, list[tuple[int, dict[str, Any]]]]:
    per_partition: dict[int, list[tuple[int, dict[str, Any]]]] = {
        tp.partition: [] for tp in assigned
    }
    remaining = {tp.partition for tp in assigned}
    undecodable = 0
    if assigned:
        consumer.assign(assigned)
    deadline = time.monotonic() + HISTORY_READ_TIMEOUT_S
    while remaining and time.monotonic() < deadline:
        for message in consumer.consume(5000, 0.5):
            partition = message.partition()
            if message.error():
                if message.error().code() == KafkaError._PARTITION_EOF:
                    remaining.discard(partition)
                continue
            try:
                record = orjson.loads(message.value() or b"")
            except orjson.JSONDecodeError:
                undecodable += 1
            else:
                if isinstance(record, dict):
                    per_partition[partition].append((message.timestamp()[1], record))
            if message.offset() + 1 >= ends[partition]:
                remaining.discard(partition)
    if remaining:
        log.warning("history_read_incomplete", partitions=sorted(remaining))
    log.info(
        "history_read",
        partitions=len(assigned),
        scans=sum(len(v) for v in per_partition.values()),
        undecodable=undecodable,
    )
    return per_partition


def split_holdout(
    records: list[dict[str, Any]], settings: Settings
) -> tuple[list[dict[str, Any]], dict[str, list[Row]], pd.DataFrame]:
    """Training records, held-out journeys (EPC → rows) and the scan frame of the whole window.

    The split is by EPC, so the candidate never sees an item it is evaluated on.
    """
    journeys = group_journeys(records, settings.site_timezone).by_epc
    epcs = sorted(journeys)
    random.Random(settings.seed).shuffle(epcs)
    held_out = set(epcs[: int(len(epcs) * settings.validation_share)])
    frame = scan_frame(journeys)
    training_rows = sorted(
        (row for epc, rows in journeys.items() if epc not in held_out for row in rows),
        key=lambda row: row["_arrival"],
    )
    training = [{k: v for k, v in row.items() if not k.startswith("_")} for row in training_rows]
    return training, {epc: journeys[epc] for epc in sorted(held_out)}, frame


def evaluation_set(
    held_out: dict[str, list[Row]],
    frame: pd.DataFrame,
    settings: Settings,
    locations: pd.DataFrame | None,
) -> EvaluationSet:
    """Inject anomalies of the five types into held-out journeys; label what each scan shows.

    The injector works from the network of the whole recent window, so the same anomalies
    test both models whatever either one learned.
    """
    reference = learn_reference(frame, settings, locations)
    rng = random.Random(settings.seed + 1)
    injector = Injector(reference, rng, settings.dup_window_s, settings.max_epc_age_days)
    incidents = injector.inject(held_out, settings.train_anomaly_share)
    rows = sorted((r for rows in held_out.values() for r in rows), key=lambda r: r["_arrival"])
    # Limitation: injected times are written as UTC, so held-out scans are read as UTC as in
    # training, whatever `site_timezone` says.
    return EvaluationSet([to_scan(row) for row in rows], detection_labels(incidents))


def evaluate_model(model: LoadedModel, data: EvaluationSet, settings: Settings) -> Evaluation:
    """Score the held-out scans as the detector would (in poll-sized batches) and compare.

    Macro-F1 is the mean of the per-type F1 on scans; the false-alarm rate is the share of
    scans with no injected anomaly that are flagged with any type.
    """
    inferencer = Inferencer(model, settings)
    table = inferencer.table()
    size = settings.batch_max_messages
    hits = np.zeros((len(data.scans), len(ANOMALY_TYPES)), dtype=bool)
    for start in range(0, len(data.scans), size):
        batch = inferencer.score_batch(data.scans[start : start + size], table)
        hits[start : start + size] = batch.flags

    truth = np.array(
        [[t in data.labels.get(s.event_id, ()) for t in ANOMALY_TYPES] for s in data.scans],
        dtype=bool,
    ).reshape(-1, len(ANOMALY_TYPES))
    per_type = {t: _f1(hits[:, i], truth[:, i]) for i, t in enumerate(ANOMALY_TYPES)}
    clean = ~truth.any(axis=1)
    false_alarms = float((hits.any(axis=1) & clean).sum()) / max(1, int(clean.sum()))
    return Evaluation(
        macro_f1=float(np.mean(list(per_type.values()))),
        per_type_f1=per_type,
        false_alarm_rate=false_alarms,
        scans=len(data.scans),
    )


def _f1(flagged: np.ndarray, truth: np.ndarray) -> float:
    tp = float((flagged & truth).sum())
    denominator = float(flagged.sum() + truth.sum())
    return 1.0 if denominator == 0 else 2 * tp / denominator


def locations_of(model: LoadedModel | None) -> pd.DataFrame | None:
    """The current model's site coordinates, so a candidate keeps physical travel limits."""
    if model is None or not model.reference.coordinates:
        return None
    return pd.DataFrame(
        [
            {
                "location_id": site,
                "scan_location": model.reference.site_names.get(site, site),
                "latitude": lat,
                "longitude": lon,
            }
            for site, (lat, lon) in sorted(model.reference.coordinates.items())
        ]
    )


def train_candidate(
    records: list[dict[str, Any]],
    settings: Settings,
    root: Path,
    locations: pd.DataFrame | None,
) -> Path:
    return train_model(records, settings, root, locations, show_progress=False)


def decide(candidate: Evaluation, current: Evaluation | None, margin: float) -> tuple[bool, str]:
    """Promote when the candidate is not worse than the current model by more than `margin`."""
    if current is None:
        return True, "no current model"
    if candidate.macro_f1 >= current.macro_f1 - margin:
        return True, (
            f"candidate macro-F1 {candidate.macro_f1:.4f} is within {margin} of the current "
            f"model's {current.macro_f1:.4f}"
        )
    return False, (
        f"candidate macro-F1 {candidate.macro_f1:.4f} is more than {margin} below the current "
        f"model's {current.macro_f1:.4f}"
    )


def publish_update(settings: Settings, update: ModelUpdate) -> bool:
    """Publish a model update and wait for the broker's acknowledgement."""
    producer = make_producer(settings)
    tracker = DeliveryTracker()
    producer.produce(
        settings.topic_models,
        key=(update.candidate_version or "").encode(),
        value=update.model_dump_json().encode(),
        on_delivery=tracker,
    )
    producer.flush(DELIVERY_TIMEOUT_S)
    acknowledged = tracker.delivered == 1
    if not acknowledged:
        log.error(
            "model_update_not_acknowledged",
            topic=settings.topic_models,
            errors=[str(e) for e in tracker.failed],
        )
    return acknowledged


def current_model(settings: Settings) -> LoadedModel | None:
    """The model `models/current` points at, or None when there is none or it does not load."""
    link = settings.models_root / "current"
    if not (link / META_FILE).exists():
        return None
    try:
        return load_model(link)
    except ModelUnavailable as exc:
        log.warning("current_model_unusable", path=str(link), error=str(exc))
        return None


class RetrainWorker:
    """Consumes drift events in its own group and turns retrain requests into model decisions.

    Requests are debounced by `drift_cooldown_s` across every detector instance: a request
    detected before the last retrain started plus the cooldown is acknowledged and skipped.
    A request's offset is committed only after its decision is published, so a crash while
    training replays the request.
    """

    def __init__(
        self,
        settings: Settings,
        trainer: Trainer = train_candidate,
        evaluator: Evaluator = evaluate_model,
    ) -> None:
        self.settings = settings
        self.trainer = trainer
        self.evaluator = evaluator
        self.last_started_s = -math.inf
        self.stopping = False
        self.skipped = 0

    def request_stop(self, *_: Any) -> None:
        self.stopping = True

    def run(self, once: bool = False) -> list[ModelUpdate]:
        """Handle requests until SIGTERM/SIGINT, or after the first decision with `once`."""
        previous = {
            sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        consumer = Consumer(
            {
                "bootstrap.servers": self.settings.bootstrap_servers,
                "group.id": retrainer_group(self.settings),
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "max.poll.interval.ms": MAX_RETRAIN_MS,
            }
        )
        consumer.subscribe([self.settings.topic_drift])
        log.info(
            "retrainer_started",
            topic=self.settings.topic_drift,
            group=retrainer_group(self.settings),
        )
        updates: list[ModelUpdate] = []
        try:
            # Limitation: a stop requested while a candidate trains waits for training to end.
            while not self.stopping and not (once and updates):
                message = consumer.poll(self.settings.poll_timeout_s)
                if message is None:
                    continue
                if message.error():
                    log.warning("retrainer_consume_error", error=str(message.error()))
                    continue
                update = self.handle(message)
                if update is not None:
                    updates.append(update)
                    if not publish_update(self.settings, update):
                        raise UpdateNotAcknowledged(
                            f"the model update for {update.candidate_version} was not "
                            f"acknowledged on {self.settings.topic_models}; the request is "
                            "left uncommitted and is handled again on restart"
                        )
                self._commit(consumer, message)
        finally:
            consumer.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            log.info("retrainer_stopped", decisions=len(updates), skipped=self.skipped)
        return updates

    def handle(self, message: Message) -> ModelUpdate | None:
        """The decision for one drift-event message, or None when it asks for no retrain."""
        context = {
            "topic": message.topic(),
            "partition": message.partition(),
            "offset": message.offset(),
        }
        try:
            event = DriftEvent.model_validate_json(message.value() or b"")
        except ValidationError as exc:
            log.warning("drift_event_unreadable", error=str(exc).splitlines()[0], **context)
            return None
        if event.action != RETRAIN_ACTION:
            return None
        requested_s = _timestamp_s(event.detected_at, message)
        if requested_s < self.last_started_s + self.settings.drift_cooldown_s:
            self.skipped += 1
            log.info("retrain_request_debounced", drift_id=event.drift_id, **context)
            return None
        self.last_started_s = time.time()
        log.info("retrain_started", drift_id=event.drift_id, **context)
        return self.retrain(event.drift_id)

    def retrain(self, drift_id: str | None = None) -> ModelUpdate:
        """Read recent history, train a candidate, evaluate both models, promote or reject."""
        settings = self.settings
        started = time.monotonic()
        records = read_recent_scans(settings, time.time() - settings.retrain_history_s)
        current = current_model(settings)
        training, held_out, frame = split_holdout(records, settings)
        if len(held_out) < MIN_EVALUATION_EPCS:
            reason = (
                f"recent history has {len(held_out)} held-out EPCs; evaluation needs at least "
                f"{MIN_EVALUATION_EPCS} (read {len(records)} scans)"
            )
            return self._rejected_without_candidate(current, len(records), drift_id, reason)
        locations = locations_of(current)
        try:
            path = self.trainer(training, settings, settings.models_root, locations)
        except ValueError as exc:
            return self._rejected_without_candidate(current, len(records), drift_id, str(exc))

        data = evaluation_set(held_out, frame, settings, locations)
        candidate_model = load_model(path)
        candidate = self.evaluator(candidate_model, data, settings)
        baseline = self.evaluator(current, data, settings) if current is not None else None
        promoted, reason = decide(candidate, baseline, settings.retrain_margin)
        if promoted:
            promote(settings.models_root, path.name)

        update = _decision(candidate_model, current, candidate, baseline, promoted, reason)
        update.margin = settings.retrain_margin
        update.history_scans = len(records)
        update.drift_id = drift_id
        write_evaluation(path, update, candidate, baseline)
        log.info(
            "retrain_decided",
            decision=update.decision,
            candidate_version=update.candidate_version,
            current_version=update.current_version,
            candidate_f1=update.candidate_f1,
            current_f1=update.current_f1,
            margin=update.margin,
            reason=reason,
            seconds=round(time.monotonic() - started, 1),
        )
        return update

    def _rejected_without_candidate(
        self, current: LoadedModel | None, scans: int, drift_id: str | None, reason: str
    ) -> ModelUpdate:
        log.warning("retrain_without_candidate", reason=reason, history_scans=scans)
        return ModelUpdate(
            update_id=uuid.uuid4().hex,
            decision="rejected",
            reason=reason,
            candidate_version=None,
            current_version=current.version if current else None,
            candidate_f1=None,
            current_f1=None,
            margin=self.settings.retrain_margin,
            history_scans=scans,
            drift_id=drift_id,
            decided_at=_now_iso(),
        )

    def _commit(self, consumer: Consumer, message: Message) -> None:
        try:
            consumer.commit(message=message, asynchronous=False)
        except KafkaException as exc:
            # The request is handed out again after a rebalance; the debounce absorbs it.
            log.warning("retrainer_commit_failed", error=str(exc), offset=message.offset())


def _decision(
    candidate_model: LoadedModel,
    current: LoadedModel | None,
    candidate: Evaluation,
    baseline: Evaluation | None,
    promoted: bool,
    reason: str,
) -> ModelUpdate:
    per_type = {"candidate": {t: round(v, 4) for t, v in candidate.per_type_f1.items()}}
    if baseline is not None:
        per_type["current"] = {t: round(v, 4) for t, v in baseline.per_type_f1.items()}
    return ModelUpdate(
        update_id=uuid.uuid4().hex,
        decision="promoted" if promoted else "rejected",
        reason=reason,
        candidate_version=candidate_model.version,
        current_version=current.version if current else None,
        candidate_f1=round(candidate.macro_f1, 4),
        current_f1=round(baseline.macro_f1, 4) if baseline else None,
        margin=0.0,
        candidate_false_alarm_rate=round(candidate.false_alarm_rate, 5),
        current_false_alarm_rate=round(baseline.false_alarm_rate, 5) if baseline else None,
        per_type_f1=per_type,
        evaluation_scans=candidate.scans,
        decided_at=_now_iso(),
    )


def write_evaluation(
    path: Path, update: ModelUpdate, candidate: Evaluation, current: Evaluation | None
) -> None:
    """Keep the retrain evaluation beside the candidate, for `epcwatch models`."""
    document = {
        "decision": update.decision,
        "reason": update.reason,
        "compared_with": update.current_version,
        "candidate": asdict(candidate),
        "current": asdict(current) if current else None,
        "decided_at": update.decided_at,
    }
    (path / EVALUATION_FILE).write_text(json.dumps(document, indent=1))


def model_versions(root: Path) -> Iterator[dict[str, Any]]:
    """Every model under `root`, oldest first: version, created time, current, key numbers."""
    link = root / "current"
    live = link.resolve().name if link.is_symlink() else None
    directories = [d for d in root.iterdir() if d.is_dir() and not d.is_symlink()]
    for directory in sorted(directories, key=lambda d: d.name):
        meta_path = directory / META_FILE
        if not meta_path.exists():
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            continue
        per_type = meta.get("metrics", {}).get("per_type", {})
        f1 = {t: per_type[t]["combined"]["f1"] for t in ANOMALY_TYPES if t in per_type}
        evaluation_path = directory / EVALUATION_FILE
        evaluation = json.loads(evaluation_path.read_text()) if evaluation_path.exists() else {}
        yield {
            "version": directory.name,
            "created": datetime.fromtimestamp(meta_path.stat().st_mtime, UTC),
            "current": directory.name == live,
            "validation_f1": f1,
            "validation_macro_f1": float(np.mean(list(f1.values()))) if f1 else None,
            "history_scans": meta.get("training", {}).get("history_scans"),
            "retrain": evaluation,
        }


def _timestamp_s(detected_at: str, message: Message) -> float:
    try:
        return datetime.fromisoformat(detected_at).timestamp()
    except ValueError:
        return message.timestamp()[1] / 1000


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
