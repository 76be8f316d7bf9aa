"""Helpers for tests against the real local broker: isolated topics, a detector process, reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from config import Settings
from producer.kafka import end_offsets, ensure_topics

REPO = Path(__file__).resolve().parents[1]


def isolated_settings(model_dir: Path, **overrides) -> Settings:
    """Settings with topics and group of their own, so tests never see each other's data."""
    tag = uuid.uuid4().hex[:8]
    own = {
        name: f"t-{tag}-{name.removeprefix('topic_')}"
        for name in Settings.model_fields
        if name.startswith("topic_") and name not in ("topic_partitions", "topic_replication")
    }
    settings = Settings(
        **{**own, "group_id": f"t-{tag}-detector", "model_dir": model_dir, **overrides}
    )
    ensure_topics(settings)
    return settings


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process exactly these settings."""
    env = dict(os.environ)
    for name, field in Settings.model_fields.items():
        value = getattr(settings, name)
        default = field.default_factory() if field.default_factory else field.default
        if value != default or name.startswith("topic_") or name == "group_id":
            env[f"EPCWATCH_{name.upper()}"] = (
                json.dumps(value) if isinstance(value, list) else str(value)
            )
    env["EPCWATCH_LOG_FORMAT"] = "json"
    return env


def run_detector(settings: Settings, idle_exit_s: float = 6.0, timeout_s: float = 300.0):
    """Run `epcwatch detect` until it has been idle for `idle_exit_s`; returns the process."""
    return subprocess.run(
        [sys.executable, "-m", "epcwatch", "detect", "--idle-exit-s", str(idle_exit_s)],
        env=settings_env(settings),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def read_all(settings: Settings, topic: str, timeout_s: float = 60.0) -> list:
    """Every committed message on `topic` from the beginning to its end as of the call.

    The end is each partition's high watermark when the read starts, reached when the consumer
    reports partition EOF at or past it: transaction markers and aborted messages take offsets
    that a read_committed consumer never sees, and while a transaction is open it reports EOF
    early, at the last stable offset (a killed exactly-once detector leaves one open until its
    successor fences it or the broker times it out). Committed messages after that point are
    part of the topic, so the read waits for them.
    """
    import time

    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"reader-{uuid.uuid4().hex[:6]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    ends = end_offsets(settings.bootstrap_servers, topic, partitions)
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    remaining = set(partitions)
    messages = []
    deadline = time.monotonic() + timeout_s
    while remaining and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is None:
            continue
        if message.error():
            if message.error().code() == KafkaError._PARTITION_EOF and (
                message.offset() >= ends[message.partition()]
            ):
                remaining.discard(message.partition())
            continue
        messages.append(message)
    consumer.close()
    assert not remaining, f"could not read {topic} to its end in {timeout_s} s"
    return messages


def read_alerts(settings: Settings, timeout_s: float = 60.0) -> list[dict]:
    return [orjson.loads(m.value()) for m in read_all(settings, settings.topic_alerts, timeout_s)]


# Every detector `start_detector` started: a test that fails before ending its detectors
# leaves them to the `conftest` fixture that kills what is still running after each test.
STARTED: list[subprocess.Popen] = []


def start_detector(settings: Settings, idle_exit_s: float = 0.0, **env_overrides: str):
    """Start `epcwatch detect` in the background; the caller ends it (by its PID)."""
    env = settings_env(settings)
    env.update({f"EPCWATCH_{k.upper()}": str(v) for k, v in env_overrides.items()})
    args = [sys.executable, "-m", "epcwatch", "detect"]
    if idle_exit_s:
        args += ["--idle-exit-s", str(idle_exit_s)]
    # Logs go to a file: a pipe nobody reads would fill up and stall the detector.
    log = tempfile.NamedTemporaryFile(prefix="detector-", suffix=".log", delete=False)
    process = subprocess.Popen(args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    process.log_path = log.name  # type: ignore[attr-defined]
    STARTED.append(process)
    return process


def wait_until_consuming(process, timeout_s: float = 120.0) -> None:
    """Block until a started detector has been given its partitions."""
    import time

    deadline = time.monotonic() + timeout_s
    while '"partitions_assigned"' not in open(process.log_path).read():
        assert process.poll() is None, open(process.log_path).read()[-2000:]
        assert time.monotonic() < deadline, "the detector never joined its group"
        time.sleep(0.5)


def committed_all(settings: Settings) -> bool:
    """Whether the detector group has committed every scan on the scan topic."""
    topic = settings.topic_scans
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": settings.group_id,
            "enable.auto.commit": False,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        tps = [TopicPartition(topic, p) for p in partitions]
        try:
            committed = {tp.partition: tp.offset for tp in consumer.committed(tps, timeout=10)}
        except KafkaException:
            return False  # e.g. the group coordinator is still loading after a broker restart
        return all(
            committed[p] >= consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        )
    finally:
        consumer.close()


def labelled_events(incidents) -> dict[str, set[str]]:
    labels: dict[str, set[str]] = {}
    for incident in incidents:
        for row in incident.rows:
            labels.setdefault(row["eventId"], set()).add(incident.anomaly_type)
    return labels


def check_alerts_against_labels(alerts: list[dict], incidents, min_recall: float = 0.9) -> None:
    """Each type caught on its labelled events; almost no alert on an unlabelled event."""
    from detector.schema import ANOMALY_TYPES

    labels = labelled_events(incidents)
    by_type: dict[str, set[str]] = {}
    for alert in alerts:
        by_type.setdefault(alert["anomaly_type"], set()).add(alert["event_id"])
    for anomaly_type in ANOMALY_TYPES:
        mine = [i for i in incidents if i.anomaly_type == anomaly_type]
        flagged = by_type.get(anomaly_type, set())
        caught = [i for i in mine if {r["eventId"] for r in i.rows} & flagged]
        missed = [
            [(r["eventId"], r["event_type"], r["event_time"], r["epc_code"]) for r in i.rows]
            for i in mine
            if i not in caught
        ]
        assert len(caught) >= min_recall * len(mine), (anomaly_type, len(caught), len(mine), missed)
        wrong = {e for e in flagged if anomaly_type not in labels.get(e, set())}
        assert len(wrong) <= max(1, 0.02 * len(flagged)), (anomaly_type, sorted(wrong)[:5])
