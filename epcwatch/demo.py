"""`make run`: the whole pipeline once, from an empty machine to alerts on screen.

Creates the topics, trains a model on simulated history if there is none, starts a detector
process, replays a simulated stream with injected anomalies, waits until the detector has
committed everything, stops it with SIGTERM, and compares the alerts with the injected labels.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import orjson
import typer
from confluent_kafka import Consumer, TopicPartition

from config import Settings
from detector.artifact import META_FILE, promote
from detector.schema import ANOMALY_TYPES, ANOMALY_WORDS
from producer.kafka import ensure_topics
from producer.publish import publish_scans
from producer.readers import read_scans
from producer.simulate import locations_frame, simulate, write_simulation

HISTORY_ITEMS = 20000
CATCH_UP_TIMEOUT_S = 600.0


def _ensure_model(settings: Settings, workdir: Path) -> None:
    if (settings.model_dir / META_FILE).exists():
        typer.echo(f"model: {settings.model_dir.resolve().name} (at {settings.model_dir})")
        return
    from detector.train import train_model

    typer.echo(f"no model at {settings.model_dir}: training one on {HISTORY_ITEMS} simulated items")
    history = simulate(HISTORY_ITEMS, settings.seed, settings)
    write_simulation(history, workdir / "history.tsv")
    records = (
        {k: v for k, v in r.items() if not k.startswith("_")}
        for r in history.rows_in_arrival_order()
    )
    path = train_model(
        records,
        settings,
        settings.models_root,
        locations_frame(history.network),
        show_progress=sys.stderr.isatty(),
    )
    if settings.model_dir == settings.models_root / "current":
        promote(settings.models_root, path.name)
    typer.echo(f"model trained: {path}")


def _offsets(settings: Settings, topic: str, group: str | None) -> dict[int, int]:
    """High watermarks of `topic` per partition, or the group's committed offsets."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": group or "epcwatch-demo-probe",
            "enable.auto.commit": False,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        tps = [TopicPartition(topic, p) for p in partitions]
        if group:
            return {tp.partition: max(tp.offset, 0) for tp in consumer.committed(tps, timeout=10)}
        return {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in tps}
    finally:
        consumer.close()


def _read_alerts(settings: Settings, start: dict[int, int]) -> list[dict]:
    end = _offsets(settings, settings.topic_alerts, None)
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": "epcwatch-demo-reader",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    consumer.assign([TopicPartition(settings.topic_alerts, p, o) for p, o in start.items()])
    remaining = {p for p in end if end[p] > start.get(p, 0)}
    alerts: list[dict] = []
    deadline = time.monotonic() + 60
    while remaining and time.monotonic() < deadline:
        message = consumer.poll(1.0)
        if message is None or message.error():
            continue
        alerts.append(orjson.loads(message.value()))
        if message.offset() + 1 >= end[message.partition()]:
            remaining.discard(message.partition())
    consumer.close()
    return alerts


def run_demo(settings: Settings, items: int, anomaly_share: float, workdir: Path) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    counts = ensure_topics(settings)
    typer.echo("topics: " + ", ".join(f"{t} ({n})" for t, n in counts.items()))
    _ensure_model(settings, workdir)

    seed = int(time.time()) % 1_000_000
    stream = simulate(
        items, seed, settings, anomaly_share, days=5, start=datetime(2025, 7, 20, tzinfo=UTC)
    )
    paths = write_simulation(stream, workdir / "stream.tsv")
    typer.echo(
        f"stream: {paths['scans']} ({len(stream.incidents)} injected incidents, "
        f"labels in {paths['labels']})"
    )

    alerts_start = _offsets(settings, settings.topic_alerts, None)
    env = dict(os.environ, EPCWATCH_LOG_FORMAT="json")
    log_path = workdir / "detector.log"
    with log_path.open("w") as log_file:
        detector = subprocess.Popen(
            [sys.executable, "-m", "epcwatch", "detect"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            report = publish_scans(
                read_scans(paths["scans"]), settings, show_progress=sys.stderr.isatty()
            )
            typer.echo(
                f"published {report.published} scans in {report.seconds:.1f} s; "
                "waiting for the detector to commit them"
            )
            target = _offsets(settings, settings.topic_scans, None)
            deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
            while time.monotonic() < deadline:
                if detector.poll() is not None:
                    typer.secho(f"detector exited early; see {log_path}", fg="red", err=True)
                    return 1
                done = _offsets(settings, settings.topic_scans, settings.group_id)
                if all(done.get(p, 0) >= o for p, o in target.items()):
                    break
                time.sleep(1.0)
            else:
                typer.secho("detector did not catch up in time", fg="red", err=True)
                return 1
        finally:
            if detector.poll() is None:
                detector.send_signal(signal.SIGTERM)
                detector.wait(60)

    alerts = _read_alerts(settings, alerts_start)
    (workdir / "alerts.jsonl").write_bytes(b"".join(orjson.dumps(a) + b"\n" for a in alerts))
    return _print_summary(stream, alerts, workdir)


def _print_summary(stream, alerts: list[dict], workdir: Path) -> int:
    labelled: dict[str, set[str]] = defaultdict(set)
    incidents_by_type: dict[str, list] = defaultdict(list)
    for incident in stream.incidents:
        incidents_by_type[incident.anomaly_type].append(incident)
        for row in incident.rows:
            labelled[row["eventId"]].add(incident.anomaly_type)
    alerted: dict[str, set[str]] = defaultdict(set)
    for alert in alerts:
        alerted[alert["event_id"]].add(alert["anomaly_type"])

    typer.echo("")
    typer.echo(f"{'anomaly type':<13}{'injected':>9}{'caught':>8}{'alerts':>8}{'false':>7}")
    all_caught = True
    for anomaly_type in ANOMALY_TYPES:
        incidents = incidents_by_type[anomaly_type]
        caught = sum(
            any(anomaly_type in alerted[r["eventId"]] for r in inc.rows) for inc in incidents
        )
        n_alerts = sum(1 for a in alerts if a["anomaly_type"] == anomaly_type)
        false = sum(
            1
            for a in alerts
            if a["anomaly_type"] == anomaly_type and anomaly_type not in labelled[a["event_id"]]
        )
        all_caught &= caught > 0 or not incidents
        typer.echo(
            f"{anomaly_type:<13}{len(incidents):>9}{caught:>8}{n_alerts:>8}{false:>7}"
            f"   {ANOMALY_WORDS[anomaly_type]}"
        )
    typer.echo("")
    for alert in alerts[:5]:
        typer.echo(
            f"  e.g. {alert['severity']} {alert['anomaly_type']} "
            f"({alert['confidence']:.2f}) {alert['epc_code']}: "
            f"{alert['explanation']['text']}"
        )
    typer.echo(f"\nalerts: {workdir / 'alerts.jsonl'}; detector log: {workdir / 'detector.log'}")
    typer.echo(f"offline report of the same stream: epcwatch score {workdir / 'stream.tsv'}")
    return 0 if all_caught else 1
