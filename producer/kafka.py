"""Kafka plumbing shared by every epcwatch process: producers, topic creation, delivery checks."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import structlog
from confluent_kafka import (
    IsolationLevel,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

from config import Settings

log = structlog.get_logger(__name__)


class BrokerUnavailable(RuntimeError):
    """The Kafka broker did not answer; the message says where epcwatch looked."""


def producer_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    return {
        "bootstrap.servers": settings.bootstrap_servers,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 20,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 500_000,
        **extra,
    }


def make_producer(settings: Settings, **extra: Any) -> Producer:
    return Producer(producer_config(settings, **extra))


def produce_with_backpressure(producer: Producer, topic: str, **kwargs: Any) -> None:
    """Produce, and when the local queue is full serve deliveries until there is room."""
    while True:
        try:
            producer.produce(topic, **kwargs)
            return
        except BufferError:
            producer.poll(0.05)


class DeliveryTracker:
    """Delivery callback that remembers failures, so a batch is committed only when all landed."""

    def __init__(self) -> None:
        self.failed: list[KafkaError] = []
        self.delivered = 0

    def __call__(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self.failed.append(err)
        else:
            self.delivered += 1


def topic_specs(settings: Settings) -> list[NewTopic]:
    """Every topic epcwatch uses, with partitions from config; the state topic is compacted."""
    p, r = settings.topic_partitions, settings.topic_replication
    return [
        NewTopic(settings.topic_scans, p, r),
        NewTopic(settings.topic_alerts, p, r),
        NewTopic(settings.topic_dlq, p, r),
        NewTopic(settings.topic_drift, 1, r),
        NewTopic(settings.topic_models, 1, r),
        NewTopic(settings.topic_state, p, r, config={"cleanup.policy": "compact"}),
        NewTopic(settings.topic_late, p, r),
    ]


def ensure_topics(settings: Settings, timeout_s: float = 30.0) -> dict[str, int]:
    """Create missing topics; return each topic's partition count."""
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            existing = admin.list_topics(timeout=5).topics
            break
        except KafkaException as exc:
            if time.monotonic() > deadline:
                raise BrokerUnavailable(
                    f"no Kafka broker answers at {settings.bootstrap_servers} "
                    "(start one with `make kafka-up`)"
                ) from exc
    missing = [spec for spec in topic_specs(settings) if spec.topic not in existing]
    if missing:
        for topic, future in admin.create_topics(missing).items():
            try:
                future.result()
                log.info("topic_created", topic=topic)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
    wanted = {spec.topic for spec in topic_specs(settings)}
    metadata = admin.list_topics(timeout=10).topics
    while not wanted <= set(metadata) and time.monotonic() < deadline:
        time.sleep(0.2)  # newly created topics reach the metadata a moment later
        metadata = admin.list_topics(timeout=10).topics
    return {
        spec.topic: len(metadata[spec.topic].partitions)
        for spec in topic_specs(settings)
        if spec.topic in metadata
    }


def end_offsets(bootstrap_servers: str, topic: str, partitions: Iterable[int]) -> dict[int, int]:
    """Each partition's high watermark: the offset after its last record, committed or not.

    A `read_committed` consumer cannot ask for this: its watermark query answers with the last
    stable offset, which stops at the first transaction still open.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    futures = admin.list_offsets(
        {TopicPartition(topic, p): OffsetSpec.latest() for p in partitions},
        isolation_level=IsolationLevel.READ_UNCOMMITTED,
        request_timeout=10,
    )
    return {tp.partition: future.result().offset for tp, future in futures.items()}
