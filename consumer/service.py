"""The detector service: consume scan events in batches, score them, publish alerts, commit.

Alerts and side outputs are produced as each batch is scored. Work is made durable at a
checkpoint, at most every `commit_interval_s` (and when partitions are revoked, when input
pauses, and at shutdown): one changelog record per window changed since the last checkpoint,
and the consumer offsets of every batch since then.

At-least-once (the default) holds because offsets are committed only after every message
produced before them is acknowledged: alerts, dead letters, late scans and drift events first,
then the window changelog, then the offsets. A crash anywhere before the commit replays the
batches since the last checkpoint; replayed alerts keep their `alert_id`, and scans whose window
already holds them (the changelog was written) are recognised by offset and not applied twice.

Exactly-once runs the batches between two checkpoints in one Kafka transaction: outputs,
changelog and consumer offsets commit together or not at all. An abortable error aborts the
transaction and rewinds both the input (to the committed offsets) and the windows (re-read from
the committed changelog).
"""

from __future__ import annotations

import gc
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
import torch
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from config import Settings
from consumer.decode import decode_scan
from consumer.instance import Instance, claim_instance, transactional_id
from consumer.metrics import DetectorMetrics, serve
from consumer.state import WindowStore, restore_partitions
from detector.artifact import ModelUnavailable, load_model
from detector.inferencer import Inferencer, ScoredBatch
from detector.schema import Scan
from drift.monitor import ScoreMonitor
from producer.kafka import DeliveryTracker, make_producer, produce_with_backpressure

log = structlog.get_logger(__name__)

# How often the service logs its progress and refreshes lag, in seconds of wall time.
PROGRESS_EVERY_S = 10.0
FLUSH_TIMEOUT_S = 60.0
TRANSACTION_TIMEOUT_S = 30.0
GC_YOUNG_THRESHOLD = 10_000
GC_FULL_EVERY_S = 600.0
# Keys and values forwarded to the DLQ or the late topic are cut to at most this many bytes.
SIDE_OUTPUT_MAX_BYTES = 256 * 1024
# Expiry looks at every window, so it runs at most this often (in wall time), not every batch.
EXPIRE_EVERY_S = 1.0


GROUP_GONE = frozenset(
    {
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.FENCED_INSTANCE_ID,
    }
)


# A newer producer with this detector's transactional id took over.
FENCED = frozenset(
    {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}
)


class DetectorFenced(RuntimeError):
    """Another live detector started with this one's transactional id; this one must stop."""


class DeliveryFailed(RuntimeError):
    """Some output of a batch was not acknowledged; its offsets were not committed."""


@dataclass
class Counters:
    consumed: int = 0
    scored: int = 0
    dead_lettered: int = 0
    late: int = 0
    replayed: int = 0
    alerts: Counter[str] = field(default_factory=Counter)
    drift_events: int = 0
    batches: int = 0
    aborted: int = 0

    def as_fields(self) -> dict[str, Any]:
        return {
            "consumed": self.consumed,
            "scored": self.scored,
            "dead_lettered": self.dead_lettered,
            "late": self.late,
            "replayed": self.replayed,
            "alerts": dict(self.alerts),
            "drift_events": self.drift_events,
            "batches": self.batches,
            "aborted": self.aborted,
        }


class DetectorService:
    """One detector process in the consumer group."""

    def __init__(self, settings: Settings, stop: threading.Event | None = None) -> None:
        self.settings = settings
        self.stop = stop or threading.Event()
        self.exactly_once = settings.processing_guarantee == "exactly_once"
        torch.set_num_threads(settings.torch_threads)
        self.metrics = DetectorMetrics()
        self.metrics.stall_s = settings.health_stall_s
        model = load_model(settings.model_dir)
        self.model_path = settings.model_dir.resolve()
        self.inferencer = Inferencer(model, settings)
        self.metrics.set_model(model.version)
        self.windows = WindowStore(
            settings.window_scans,
            self.inferencer.hidden,
            model.reference.registered_prefixes,
            settings.state_max_epcs,
            settings.state_ttl_s,
        )
        self.watermarks: dict[int, float] = {}
        self.replay_upto: dict[int, int] = {}  # per partition: scans up to here may be replays
        self.last_expiry = 0.0
        # What the batches since the last checkpoint produced and consumed.
        self.tracker = DeliveryTracker()
        self.pending: dict[tuple[str, int], int] = {}
        self.in_transaction = False
        self.last_checkpoint = time.monotonic()
        self.failed = False  # set when the loop ends by an exception: nothing more is committed
        self.retry_after = 0.0  # an abandoned commit is retried on a pause no sooner than this
        self.waiting_for_others = False  # logged once: an idle exit waits for other partitions
        self.monitor = ScoreMonitor(
            settings.drift_delta,
            settings.drift_min_scans,
            settings.drift_cooldown_s,
            settings.drift_min_effect,
        )
        self.counters = Counters()
        self.assigned: set[int] = set()
        self.consumer = Consumer(
            {
                "bootstrap.servers": settings.bootstrap_servers,
                "group.id": settings.group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "max.poll.interval.ms": 300_000,
                "session.timeout.ms": int(settings.session_timeout_s * 1000),
                "partition.assignment.strategy": "cooperative-sticky",
            }
        )
        # Only failed deliveries call back: a batch is committed once `flush` leaves nothing
        # queued and no callback reported a failure, so successes need no Python call each.
        extra: dict[str, Any] = {"delivery.report.only.error": True}
        self.instance: Instance | None = None
        if self.exactly_once:
            # A stable id: starting with it aborts the open transaction a killed predecessor
            # left, which would otherwise hold back every read_committed reader of its topics.
            self.instance = claim_instance(settings.group_id, settings.instance_id)
            extra |= {
                "transactional.id": transactional_id(settings.group_id, self.instance),
                "transaction.timeout.ms": int(TRANSACTION_TIMEOUT_S * 1000),
            }
        self.fatal: KafkaError | None = None  # the producer's fatal error, once it has one
        extra["error_cb"] = self._producer_error
        self.producer = make_producer(settings, **extra)
        if self.exactly_once:
            self.producer.init_transactions(30)
        self.server = serve(self.metrics, settings.metrics_port) if settings.metrics_port else None
        # Per-EPC windows are millions of long-lived objects without reference cycles, and a
        # full pass of the cyclic collector scans them all: with automatic full passes they
        # took a fifth of the time and paused the detector for up to 0.8 s. Young objects are
        # still collected as usual; the oldest generation only by hand, between batches, every
        # `GC_FULL_EVERY_S`. What was loaded at start (torch, the model) is left out for good.
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 1_000_000_000)

    def request_stop(self, *_: Any) -> None:
        self.stop.set()

    def run(self) -> Counters:
        """Consume until SIGTERM/SIGINT (or idle for `idle_exit_s`); returns the counters."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        # Rebalance callbacks only run inside poll, between batches: a revoked partition's work
        # is checkpointed in the callback, before it is given up.
        self.consumer.subscribe(
            [self.settings.topic_scans],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        log.info(
            "detector_started",
            model_version=self.inferencer.version,
            topic=self.settings.topic_scans,
            group=self.settings.group_id,
            guarantee=self.settings.processing_guarantee,
            instance=self.instance.name if self.instance else None,
        )
        last_input = last_progress = last_model_check = last_full_gc = time.monotonic()
        try:
            while not self.stop.is_set():
                messages = self.consumer.consume(
                    self.settings.batch_max_messages, self.settings.poll_timeout_s
                )
                now = time.monotonic()
                if messages or not self.assigned:
                    # Idle means owning partitions with nothing to read: waiting for the group
                    # to hand partitions over (a dead member's session to expire) is not idle.
                    last_input = now
                if messages:
                    self.process(messages)
                elif (self.pending or self.in_transaction) and now >= self.retry_after:
                    self.checkpoint()  # input paused: make what was done durable now
                elif self.settings.idle_exit_s and now - last_input >= self.settings.idle_exit_s:
                    # Nothing came for a while, but a restore or a slow fetch can do that too:
                    # the broker must confirm every owned partition is read to its end.
                    if self._caught_up():
                        log.info("detector_idle_exit", idle_s=self.settings.idle_exit_s)
                        break
                    last_input = now
                if now - last_full_gc >= GC_FULL_EVERY_S:
                    last_full_gc = now
                    self._collect_garbage()
                if now - last_model_check >= self.settings.model_check_s:
                    last_model_check = now
                    self.check_for_new_model()
                if now - last_progress >= PROGRESS_EVERY_S:
                    last_progress = now
                    self._refresh_gauges()
                    log.info(
                        "detector_progress",
                        tracked_epcs=len(self.windows),
                        **self.counters.as_fields(),
                    )
            self.checkpoint()
        except BaseException as exc:
            # Closing the consumer revokes its partitions, and revoking checkpoints: not after a
            # failure, whose batch may be half done. Its input is replayed from the last
            # checkpoint by whoever owns the partitions next.
            self.failed = True
            if isinstance(exc, KafkaException) and self._was_fenced(exc.args[0]):
                raise self._fenced(exc) from exc
            raise
        finally:
            if self.failed and self.in_transaction:
                self._abort_quietly()
            try:
                self.producer.flush(FLUSH_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - leaving anyway; the group must be left
                log.warning("producer_flush_failed", error=str(exc))
            self.consumer.close()
            if self.instance is not None:
                self.instance.release()
            if self.server is not None:
                self.server.shutdown()
            log.info(
                "detector_stopped",
                **self.counters.as_fields(),
                evicted=self.windows.evicted,
                expired=self.windows.expired,
            )
        return self.counters

    def _producer_error(self, error: KafkaError) -> None:
        if error.fatal():
            self.fatal = error
            log.error("producer_fatal_error", error=str(error))

    def _was_fenced(self, error: KafkaError) -> bool:
        """A produce after the producer was fenced fails with a generic fatal error; the
        reason reaches the error callback, served here."""
        if error.code() == KafkaError._FATAL and self.fatal is None:
            try:
                self.producer.poll(0)
            except KafkaException as exc:  # the fatal error itself, raised by the poll
                self.fatal = exc.args[0]
        cause = self.fatal if error.code() == KafkaError._FATAL and self.fatal else error
        return cause.code() in FENCED

    def _fenced(self, exc: KafkaException) -> DetectorFenced:
        name = self.instance.name if self.instance else "?"
        message = (
            f"fenced: another detector of group {self.settings.group_id!r} started with the "
            f"same transactional id, {transactional_id(self.settings.group_id, self.instance)!r} "
            f"(instance id {name!r}), and took over its transactions; this one stops. Give "
            f"every live detector its own EPCWATCH_INSTANCE_ID (or none: each process then "
            f"claims a free slot on its host). ({(self.fatal or exc.args[0]).str()})"
        )
        log.error("detector_fenced", instance=name, error=message)
        return DetectorFenced(message)

    def _abort_quietly(self) -> None:
        """Abort the open transaction on the way out, so read_committed readers need not wait
        for the broker to time it out; if that fails too, the next instance fences it."""
        self.in_transaction = False
        try:
            self.producer.abort_transaction(TRANSACTION_TIMEOUT_S)
        except KafkaException as exc:
            log.warning("transaction_abort_failed", error=str(exc))

    def _collect_garbage(self) -> None:
        started = time.monotonic()
        found = gc.collect()
        log.info("gc_full_pass", unreachable=found, pause_s=round(time.monotonic() - started, 3))

    def process(self, messages: list[Message]) -> None:
        """Score one batch and publish its outputs; checkpoint once `commit_interval_s` has
        passed since the last checkpoint."""
        started = time.monotonic()
        tracker = self.tracker
        if self.exactly_once and not self.in_transaction:
            self.producer.begin_transaction()
            self.in_transaction = True
        good = [m for m in messages if m.error() is None]
        if len(good) < len(messages):
            for message in messages:
                error = message.error()
                if error is not None and error.code() != KafkaError._PARTITION_EOF:
                    log.warning("consume_error", error=str(error))
        self.counters.consumed += len(good)
        n = len(good)
        partitions = np.fromiter((m.partition() for m in good), dtype=np.int64, count=n)
        offsets = np.fromiter((m.offset() for m in good), dtype=np.int64, count=n)
        owned = np.unique(partitions).tolist()
        for p in owned:
            mine = offsets[partitions == p]
            self.pending[(self.settings.topic_scans, p)] = int(mine.max()) + 1

        max_bytes, zone = self.settings.max_message_bytes, self.settings.site_timezone
        decoded = [decode_scan(m.value(), max_bytes, zone) for m in good]
        keep = np.array([type(d) is not str for d in decoded], dtype=bool)
        for i in np.flatnonzero(~keep).tolist():
            self._side_output(self.settings.topic_dlq, good[i], decoded[i], tracker)
            self.counters.dead_lettered += 1
            self.metrics.dead_letters.inc()
        self._skip_replays(decoded, partitions, offsets, keep)
        self._divert_late(decoded, good, partitions, keep, owned, tracker)
        rows = np.flatnonzero(keep)
        scans: list[Scan] = [decoded[i] for i in rows.tolist()]

        decoded_at = time.monotonic()
        if scans:
            self._score(scans, partitions[rows], offsets[rows], tracker)
        scored_at = time.monotonic()
        self._bound_state()
        bounded_at = time.monotonic()
        if bounded_at - self.last_checkpoint >= self.settings.commit_interval_s:
            self.checkpoint()
        finished = time.monotonic()
        if self.settings.slow_batch_s and finished - started >= self.settings.slow_batch_s:
            log.warning(
                "slow_batch",
                messages=len(messages),
                decode_ms=round((decoded_at - started) * 1000, 1),
                score_ms=round((scored_at - decoded_at) * 1000, 1),
                bound_ms=round((bounded_at - scored_at) * 1000, 1),
                commit_ms=round((finished - bounded_at) * 1000, 1),
            )
        self._count_batch(started, len(messages))

    def checkpoint(self) -> None:
        """Make every batch since the last checkpoint durable: its outputs acknowledged, the
        windows it changed in the changelog, its offsets committed (in exactly-once, the one
        transaction that holds them all committed)."""
        if self.failed:
            return
        self.last_checkpoint = time.monotonic()
        if self.exactly_once:
            if self.in_transaction:
                self.in_transaction = False
                self._commit_transaction(self.pending)
        else:
            self._flush(self.tracker)
            self._write_changelog(self.tracker)
            self._flush(self.tracker)
            if not self._commit(self.pending):
                self.tracker = DeliveryTracker()
                self.retry_after = time.monotonic() + 1.0
                return  # kept for the next checkpoint; a partition given up drops its offsets
        self.pending = {}
        self.tracker = DeliveryTracker()

    def _skip_replays(
        self, decoded: list, partitions: np.ndarray, offsets: np.ndarray, keep: np.ndarray
    ) -> None:
        """Unmark scans a window already holds (a replay after a crash): only scans up to a
        partition's replay horizon can be, and only just after a restore."""
        if not self.replay_upto:
            return
        horizon = np.array([self.replay_upto.get(p, -1) for p in partitions.tolist()])
        for i in np.flatnonzero(keep & (offsets <= horizon)).tolist():
            if self.windows.applied(decoded[i].epc, int(partitions[i]), int(offsets[i])):
                keep[i] = False
                self.counters.replayed += 1
                self.metrics.replayed.inc()

    def _divert_late(
        self,
        decoded: list,
        good: list[Message],
        partitions: np.ndarray,
        keep: np.ndarray,
        owned: list[int],
        tracker: DeliveryTracker,
    ) -> None:
        """Send scans more than `max_lateness_s` behind their partition's event time (the
        latest before them) to the late topic, and move each partition's watermark."""
        rows = np.flatnonzero(keep)
        t = np.fromiter((decoded[i].t for i in rows.tolist()), dtype=np.float64, count=len(rows))
        bound = self.settings.max_lateness_s
        for p in owned:
            mine = np.flatnonzero(partitions[rows] == p)
            if not len(mine):
                continue
            times = t[mine]
            before = self.watermarks.get(p, float("-inf"))
            # The watermark before each scan: a late scan is below it, so counting it in the
            # running maximum changes nothing after it.
            running = np.maximum.accumulate(times)
            prior = np.maximum(before, np.concatenate(([-np.inf], running[:-1])))
            self.watermarks[p] = max(before, float(running[-1]))
            for i in rows[mine[times < prior - bound]].tolist():
                reason = (
                    f"event time {decoded[i].event_time} is more than max_lateness_s="
                    f"{bound:.0f} behind the partition's event time"
                )
                self._side_output(self.settings.topic_late, good[i], reason, tracker)
                keep[i] = False
                self.counters.late += 1
                self.metrics.late.inc()

    def _score(
        self,
        scans: list[Scan],
        partitions: np.ndarray,
        offsets: np.ndarray,
        tracker: DeliveryTracker,
    ) -> None:
        inferencer, windows = self.inferencer, self.windows
        batch = inferencer.score_batch(scans, windows)
        self.metrics.scored.inc(len(scans))
        self.counters.scored += len(scans)
        windows.mark(batch.slots, partitions, offsets)
        for i in batch.flagged_rows().tolist():
            for alert in inferencer.alerts(batch, i, windows):
                self.counters.alerts[alert.anomaly_type] += 1
                self.metrics.alerts.labels(alert.anomaly_type, alert.severity).inc()
                produce_with_backpressure(
                    self.producer,
                    self.settings.topic_alerts,
                    key=alert.epc_code.encode(),
                    value=alert.model_dump_json().encode(),
                    on_delivery=tracker,
                )
        self._watch_drift(scans, batch, tracker)

    def _bound_state(self) -> None:
        """The cap after every batch; expiry (a pass over all windows) once per
        `EXPIRE_EVERY_S`."""
        self.windows.bound()
        now = time.monotonic()
        if now - self.last_expiry >= EXPIRE_EVERY_S:
            self.last_expiry = now
            self.windows.expire()

    def _watch_drift(self, scans: list[Scan], batch: ScoredBatch, tracker: DeliveryTracker) -> None:
        rejected_before = self.monitor.rejected
        events = self.monitor.observe_batch(
            batch.flags,
            batch.confidence.max(axis=1),
            batch.features,
            batch.t,
            self.inferencer.version,
        )
        self.metrics.nan_scores.inc(self.monitor.rejected - rejected_before)
        for event in events:
            self.counters.drift_events += 1
            self.metrics.drift_events.inc()
            log.warning("drift_detected", **event.model_dump())
            produce_with_backpressure(
                self.producer,
                self.settings.topic_drift,
                key=event.detector_instance.encode(),
                value=event.model_dump_json().encode(),
                on_delivery=tracker,
            )

    def _write_changelog(self, tracker: DeliveryTracker) -> None:
        for epc, partition, value in self.windows.take_changes():
            produce_with_backpressure(
                self.producer,
                self.settings.topic_state,
                key=epc.encode(),
                value=value,
                partition=partition,
                on_delivery=tracker,
            )

    def _flush(self, tracker: DeliveryTracker) -> None:
        remaining = self.producer.flush(FLUSH_TIMEOUT_S)
        if remaining or tracker.failed:
            raise DeliveryFailed(
                f"{remaining} messages unsent and {len(tracker.failed)} failed "
                f"(first error: {tracker.failed[0] if tracker.failed else 'timeout'}); "
                "offsets not committed, the batch will be replayed after a restart"
            )

    def _commit(self, offsets: dict[tuple[str, int], int]) -> bool:
        """Commit synchronously; while the broker is away, keep retrying for a while. False if
        this member's generation ended first (the offsets were not committed)."""
        if not offsets:
            return True
        partitions = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        deadline = time.monotonic() + self.settings.commit_retry_s
        while True:
            try:
                self.consumer.commit(offsets=partitions, asynchronous=False)
                return True
            except KafkaException as exc:
                if exc.args[0].code() in GROUP_GONE:
                    # This member's generation is over (the coordinator restarted or the group
                    # rebalanced): these offsets cannot be committed now. Its outputs are
                    # delivered and its changelog written: the next checkpoint commits them for
                    # the partitions this member still owns, and a partition's next owner
                    # replays the rest, skips the scans already in the windows, and alert ids
                    # repeat.
                    log.warning("commit_abandoned", error=str(exc))
                    return False
                if time.monotonic() > deadline:
                    raise
                log.warning("commit_retry", error=str(exc))
                time.sleep(1.0)

    def _commit_transaction(self, offsets: dict[tuple[str, int], int]) -> None:
        """Changelog, outputs and offsets in one transaction; abort and rewind on failure."""
        try:
            self._write_changelog(DeliveryTracker())
            if offsets:
                self.producer.send_offsets_to_transaction(
                    [TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                    self.consumer.consumer_group_metadata(),
                    TRANSACTION_TIMEOUT_S,
                )
            self.producer.commit_transaction(TRANSACTION_TIMEOUT_S)
        except KafkaException as exc:
            error = exc.args[0]
            if error.fatal() or not error.txn_requires_abort():
                raise
            log.warning("transaction_aborted", error=str(error))
            self.counters.aborted += 1
            self.producer.abort_transaction(TRANSACTION_TIMEOUT_S)
            self._rewind()

    def _rewind(self) -> None:
        """Back to the last committed state: offsets from the group, windows from changelog."""
        partitions = sorted(self.assigned)
        topic = self.settings.topic_scans
        committed = self.consumer.committed([TopicPartition(topic, p) for p in partitions], 30)
        self.windows.drop_partitions(set(partitions))
        self._restore(partitions)
        for tp in committed:
            self.consumer.seek(TopicPartition(topic, tp.partition, max(tp.offset, 0)))

    def _side_output(self, topic: str, message: Message, reason: str, tracker) -> None:
        """Forward a message to the DLQ or the late topic with why and where it came from.

        A key or value longer than `max_message_bytes` (capped at `SIDE_OUTPUT_MAX_BYTES`) is
        cut to that length and the header `truncated_from_bytes` gives its original size: the
        broker accepts input up to its own limit, and forwarding such a message whole, with
        headers added, could exceed the producer's, which would stop the detector on every
        restart at the same message.
        """
        log.info(
            "scan_diverted",
            to=topic,
            topic=message.topic(),
            partition=message.partition(),
            offset=message.offset(),
            reason=reason,
        )
        limit = min(self.settings.max_message_bytes, SIDE_OUTPUT_MAX_BYTES)
        key, value = message.key(), message.value()
        headers = [
            ("reason", reason.encode()),
            ("source_topic", message.topic().encode()),
            ("source_partition", str(message.partition()).encode()),
            ("source_offset", str(message.offset()).encode()),
        ]
        if key is not None and len(key) > limit:
            headers.append(("key_truncated_from_bytes", str(len(key)).encode()))
            key = key[:limit]
        if value is not None and len(value) > limit:
            headers.append(("truncated_from_bytes", str(len(value)).encode()))
            value = value[:limit]
        produce_with_backpressure(
            self.producer, topic, key=key, value=value, headers=headers, on_delivery=tracker
        )

    def check_for_new_model(self) -> None:
        """Switch to the model `model_dir` points at now, between batches; keep the old on error."""
        target = self.settings.model_dir.resolve()
        if target == self.model_path:
            return
        try:
            model = load_model(target)
        except ModelUnavailable as exc:
            self.metrics.model_load_failures.inc()
            self.metrics.model_ok = False
            log.error(
                "model_refused", path=str(target), error=str(exc), keeping=self.inferencer.version
            )
            self.model_path = target
            return
        previous = self.inferencer.version
        self.inferencer = Inferencer(model, self.settings)
        self.model_path = target
        # LSTM state belongs to the model that produced it; the new one starts from the window.
        self.windows.reset_hidden(self.inferencer.hidden)
        self.windows.registered = model.reference.registered_prefixes
        # The drift monitors' levels describe what the old model made of the stream (its
        # scores, its alert rates, the routes it knew). Compared with the new model's, they
        # would report the swap itself as drift and ask for another retrain once the cooldown
        # is over, so the new model starts a fresh watch; instance and cooldown carry over.
        monitor = ScoreMonitor(
            self.settings.drift_delta,
            self.settings.drift_min_scans,
            self.settings.drift_cooldown_s,
            self.settings.drift_min_effect,
            instance=self.monitor.instance,
            rejected=self.monitor.rejected,
        )
        monitor.last_request = self.monitor.last_request
        self.monitor = monitor
        self.metrics.model_ok = True
        self.metrics.set_model(model.version)
        log.info("model_switched", previous=previous, model_version=model.version)

    def _restore(self, partitions: list[int]) -> int:
        started = time.monotonic()
        restored = restore_partitions(
            self.windows, self.settings.bootstrap_servers, self.settings.topic_state, partitions
        )
        for p in partitions:
            mark = self.watermarks.get(p, float("-inf"))
            self.watermarks[p] = max(mark, self.windows.partition_watermark(p))
            self.replay_upto[p] = self.windows.replay_horizon(p)
        self.metrics.restored.inc(restored)
        log.info(
            "windows_restored",
            partitions=partitions,
            windows=restored,
            tracked_epcs=len(self.windows),
            seconds=round(time.monotonic() - started, 3),
        )
        return restored

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Restoring inside the callback means no scan of these partitions can be returned by
        # poll, and so scored, before its EPC's window is back. What was done before is made
        # durable first: a restore can take seconds, and an exactly-once transaction should
        # not stay open (holding back read_committed readers) through it.
        self.checkpoint()
        numbers = [p.partition for p in partitions]
        self.assigned.update(numbers)
        log.info("partitions_assigned", partitions=numbers)
        self._restore(numbers)

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # What was done since the last checkpoint is made durable before the partitions go:
        # their next owner starts from these offsets and this changelog.
        self.checkpoint()
        self._release({p.partition for p in partitions}, "partitions_revoked")

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Lost, not revoked: another member may already own them, so nothing of theirs may be
        # committed. Their next owner replays what was not committed.
        numbers = {p.partition for p in partitions}
        log.warning("partitions_lost", partitions=sorted(numbers))
        if self.in_transaction:
            # The open transaction holds their outputs and offsets too: abort it, and take the
            # partitions still owned back to their committed state.
            self.in_transaction = False
            self.counters.aborted += 1
            self.producer.abort_transaction(TRANSACTION_TIMEOUT_S)
            self._release(numbers, "partitions_lost")
            self._rewind()
            self.pending = {}
        else:
            self._release(numbers, "partitions_lost")

    def _release(self, numbers: set[int], event: str) -> None:
        self.assigned -= numbers
        self.pending = {k: o for k, o in self.pending.items() if k[1] not in numbers}
        dropped = self.windows.drop_partitions(numbers)
        for p in numbers:
            self.watermarks.pop(p, None)
            self.replay_upto.pop(p, None)
        log.info(event, partitions=sorted(numbers), windows_dropped=dropped)

    def _count_batch(self, started: float, n_messages: int) -> None:
        self.counters.batches += 1
        m = self.metrics
        m.batch_seconds.observe(time.monotonic() - started)
        m.last_batch = time.monotonic()
        m.consumed.inc(n_messages)
        m.tracked.set(len(self.windows))
        m.evicted.set(self.windows.evicted)
        m.expired.set(self.windows.expired)

    def _caught_up(self) -> bool:
        """Whether every owned partition is read to its end and committed, asked of the broker.

        A batch whose commit was abandoned (the group's generation ended under it) left its
        offsets uncommitted although its outputs were delivered: at-least-once commits them
        here, once the partitions are owned again (exactly-once rewinds such a batch instead).
        """
        topic = self.settings.topic_scans
        partitions = [TopicPartition(topic, p) for p in sorted(self.assigned)]
        behind: dict[tuple[str, int], int] = {}
        try:
            positions = self.consumer.position(partitions)
            committed = {
                tp.partition: tp.offset for tp in self.consumer.committed(partitions, timeout=10)
            }
            for tp in positions:
                low, high = self.consumer.get_watermark_offsets(tp, timeout=10)
                done = committed.get(tp.partition, -1)
                # Before its first message a partition has no position: it starts from its
                # committed offset, or from the beginning when it has none.
                read = tp.offset if tp.offset >= 0 else done
                if (read if read >= 0 else low) < high:
                    return False
                if read > done:
                    behind[(topic, tp.partition)] = read
        except KafkaException as exc:
            log.warning("caught_up_check_failed", error=str(exc))
            return False
        if behind:
            if not self.exactly_once:  # exactly-once rewinds an aborted batch instead
                self._commit(behind)
            return False
        return bool(partitions) and self._others_drained(topic)

    def _others_drained(self, topic: str) -> bool:
        """Whether the partitions this member does not own are committed to their ends too.

        A member that died still holds its partitions until its session times out; an idle
        exit before they are handed over and read would leave them unread."""
        try:
            every = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
            others = [TopicPartition(topic, p) for p in sorted(every) if p not in self.assigned]
            if not others:
                return True
            for tp in self.consumer.committed(others, timeout=10):
                low, high = self.consumer.get_watermark_offsets(tp, timeout=10)
                if (tp.offset if tp.offset >= 0 else low) < high:
                    if not self.waiting_for_others:
                        self.waiting_for_others = True
                        log.info(
                            "idle_exit_waits",
                            reason="partitions owned elsewhere or "
                            "by no live member are not committed to their end",
                            partition=tp.partition,
                        )
                    return False
        except KafkaException as exc:
            log.warning("caught_up_check_failed", error=str(exc))
            return False
        return True

    def _refresh_gauges(self) -> None:
        topic = self.settings.topic_scans
        waiting = False
        try:
            positions = self.consumer.position([TopicPartition(topic, p) for p in self.assigned])
        except KafkaException:
            return
        for tp in positions:
            _, high = self.consumer.get_watermark_offsets(tp, cached=True) or (0, 0)
            lag = max(0, high - tp.offset) if tp.offset >= 0 else high
            waiting |= lag > 0
            self.metrics.lag.labels(partition=str(tp.partition)).set(lag)
        self.metrics.input_waiting = waiting
