"""The detector service: consume scan events in batches, score them, publish alerts, commit.

At-least-once holds because offsets are committed only after every message the batch produced
(alerts, dead letters, drift events) is acknowledged by the broker; if anything fails, nothing is
committed and the batch is replayed after a restart, producing alerts with the same ids.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from config import Settings
from consumer.decode import decode_scan
from consumer.state import WindowStore
from detector.artifact import load_model
from detector.inferencer import Inferencer
from detector.schema import Scan
from drift.monitor import ScoreMonitor
from producer.kafka import DeliveryTracker, make_producer, produce_with_backpressure

log = structlog.get_logger(__name__)

# How often the service logs its progress, in seconds of wall time.
PROGRESS_EVERY_S = 10.0
FLUSH_TIMEOUT_S = 60.0


class DeliveryFailed(RuntimeError):
    """Some output of a batch was not acknowledged; its offsets were not committed."""


@dataclass
class Counters:
    consumed: int = 0
    scored: int = 0
    dead_lettered: int = 0
    alerts: Counter[str] = field(default_factory=Counter)
    drift_events: int = 0
    batches: int = 0

    def as_fields(self) -> dict[str, Any]:
        return {
            "consumed": self.consumed,
            "scored": self.scored,
            "dead_lettered": self.dead_lettered,
            "alerts": dict(self.alerts),
            "drift_events": self.drift_events,
            "batches": self.batches,
        }


class DetectorService:
    """One detector process in the consumer group."""

    def __init__(self, settings: Settings) -> None:
        if settings.processing_guarantee == "exactly_once":
            raise NotImplementedError(
                "processing_guarantee=exactly_once is not available yet; "
                "use at_least_once (the default) and de-duplicate alerts by alert_id"
            )
        self.settings = settings
        torch.set_num_threads(settings.torch_threads)
        self.inferencer = Inferencer(load_model(settings.model_dir), settings)
        self.windows = WindowStore(settings.state_max_epcs, settings.state_ttl_s)
        self.monitor = ScoreMonitor(
            settings.drift_delta, settings.drift_min_scans, settings.drift_cooldown_s
        )
        self.counters = Counters()
        self.stopping = False
        self.consumer = Consumer(
            {
                "bootstrap.servers": settings.bootstrap_servers,
                "group.id": settings.group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "max.poll.interval.ms": 300_000,
            }
        )
        self.producer = make_producer(settings)

    def request_stop(self, *_: Any) -> None:
        self.stopping = True

    def run(self) -> Counters:
        """Consume until SIGTERM/SIGINT (or idle for `idle_exit_s`); returns the counters."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        # Offsets are committed at the end of every batch, before the next poll, and
        # rebalance callbacks only run inside poll: a revoked partition has nothing pending.
        self.consumer.subscribe(
            [self.settings.topic_scans], on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        log.info(
            "detector_started",
            model_version=self.inferencer.version,
            topic=self.settings.topic_scans,
            group=self.settings.group_id,
        )
        last_input = last_progress = time.monotonic()
        try:
            while not self.stopping:
                messages = self.consumer.consume(
                    self.settings.batch_max_messages, self.settings.poll_timeout_s
                )
                now = time.monotonic()
                if messages:
                    last_input = now
                    self.process(messages)
                elif self.settings.idle_exit_s and now - last_input >= self.settings.idle_exit_s:
                    log.info("detector_idle_exit", idle_s=self.settings.idle_exit_s)
                    break
                if now - last_progress >= PROGRESS_EVERY_S:
                    last_progress = now
                    log.info(
                        "detector_progress",
                        tracked_epcs=len(self.windows),
                        **self.counters.as_fields(),
                    )
        finally:
            self.producer.flush(FLUSH_TIMEOUT_S)
            self.consumer.close()
            log.info(
                "detector_stopped",
                **self.counters.as_fields(),
                evicted=self.windows.evicted,
                expired=self.windows.expired,
            )
        return self.counters

    def process(self, messages: list[Message]) -> None:
        """Score one batch, publish its outputs, wait for acks, then commit its offsets."""
        tracker = DeliveryTracker()
        scans: list[Scan] = []
        offsets: dict[tuple[str, int], int] = {}
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("consume_error", error=str(error))
                continue
            self.counters.consumed += 1
            offsets[(message.topic(), message.partition())] = message.offset() + 1
            decoded = decode_scan(
                message.value(), self.settings.max_message_bytes, self.settings.site_timezone
            )
            if isinstance(decoded, str):
                self._dead_letter(message, decoded, tracker)
            else:
                scans.append(decoded)

        if scans:
            self._score(scans, tracker)
        self.windows.expire()

        remaining = self.producer.flush(FLUSH_TIMEOUT_S)
        if remaining or tracker.failed:
            raise DeliveryFailed(
                f"{remaining} messages unsent and {len(tracker.failed)} failed "
                f"(first error: {tracker.failed[0] if tracker.failed else 'timeout'}); "
                "offsets not committed, the batch will be replayed"
            )
        if offsets:
            self.consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                asynchronous=False,
            )
        self.counters.batches += 1

    def _score(self, scans: list[Scan], tracker: DeliveryTracker) -> None:
        inferencer = self.inferencer
        for verdict in inferencer.score(scans, self.windows):
            self.counters.scored += 1
            if verdict.flagged:
                for alert in inferencer.alerts(verdict, self.windows):
                    self.counters.alerts[alert.anomaly_type] += 1
                    produce_with_backpressure(
                        self.producer,
                        self.settings.topic_alerts,
                        key=alert.epc_code.encode(),
                        value=alert.model_dump_json().encode(),
                        on_delivery=tracker,
                    )
                continue
            drift_event = self.monitor.update(
                float(verdict.confidence.max()), verdict.scan.t, inferencer.version
            )
            if drift_event is not None:
                self.counters.drift_events += 1
                log.warning("drift_detected", **drift_event.model_dump())
                produce_with_backpressure(
                    self.producer,
                    self.settings.topic_drift,
                    key=drift_event.detector_instance.encode(),
                    value=drift_event.model_dump_json().encode(),
                    on_delivery=tracker,
                )

    def _dead_letter(self, message: Message, reason: str, tracker: DeliveryTracker) -> None:
        self.counters.dead_lettered += 1
        log.info(
            "scan_dead_lettered",
            topic=message.topic(),
            partition=message.partition(),
            offset=message.offset(),
            reason=reason,
        )
        produce_with_backpressure(
            self.producer,
            self.settings.topic_dlq,
            key=message.key(),
            value=message.value(),
            headers=[
                ("reason", reason.encode()),
                ("source_topic", message.topic().encode()),
                ("source_partition", str(message.partition()).encode()),
                ("source_offset", str(message.offset()).encode()),
            ],
            on_delivery=tracker,
        )

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("partitions_assigned", partitions=[p.partition for p in partitions])

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Limitation: windows of revoked partitions stay in memory and are not restored from a
        # changelog when another process takes the partition over.
        log.info("partitions_revoked", partitions=[p.partition for p in partitions])
