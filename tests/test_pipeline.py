"""End to end on the real broker: a stream with known anomalies in, the right alerts out."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime

import pytest

from producer.kafka import make_producer
from producer.publish import publish_scans
from producer.readers import read_scans
from producer.simulate import simulate, write_simulation
from tests.kafka_support import (
    check_alerts_against_labels,
    isolated_settings,
    read_alerts,
    read_all,
    run_detector,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STREAM_ITEMS = 3000
STREAM_START = datetime(2025, 7, 20, tzinfo=UTC)


def test_stream_with_anomalies_alerts_each_type_on_the_right_events(trained_model, tmp_path):
    settings = isolated_settings(trained_model)
    stream = simulate(STREAM_ITEMS, 5, settings, 0.05, days=5, start=STREAM_START)
    paths = write_simulation(stream, tmp_path / "stream.tsv", event_ids=False)
    report = publish_scans(read_scans(paths["scans"]), settings, show_progress=False)
    assert report.published == sum(len(j) for j in stream.journeys.values())
    assert report.bad_rows == []

    first = run_detector(settings)
    assert first.returncode == 0, first.stderr[-3000:]
    alerts = read_alerts(settings)

    check_alerts_against_labels(alerts, stream.incidents)
    by_type: dict[str, set[str]] = defaultdict(set)
    for alert in alerts:
        by_type[alert["anomaly_type"]].add(alert["event_id"])
    clones = [i for i in stream.incidents if i.anomaly_type == "epcDup"]
    both_reads = [i for i in clones if {r["eventId"] for r in i.rows} <= by_type["epcDup"]]
    assert len(both_reads) >= 0.9 * len(clones)
    assert {a["alert_id"] for a in alerts} and len({a["alert_id"] for a in alerts}) == len(alerts)

    second = run_detector(settings, idle_exit_s=4.0)
    assert second.returncode == 0, second.stderr[-3000:]
    assert len(read_alerts(settings)) == len(alerts), "a restart re-alerted committed input"


def test_clean_stream_of_the_same_size_raises_no_alert(trained_model, tmp_path):
    settings = isolated_settings(trained_model)
    stream = simulate(STREAM_ITEMS, 6, settings, 0.0, days=5, start=STREAM_START)
    paths = write_simulation(stream, tmp_path / "clean.csv", separator=",")
    report = publish_scans(read_scans(paths["scans"]), settings, show_progress=False)
    assert report.published > 10000
    result = run_detector(settings)
    assert result.returncode == 0, result.stderr[-3000:]
    alerts = read_alerts(settings)
    assert alerts == [], [a["explanation"]["text"] for a in alerts[:5]]


def test_bad_input_goes_to_the_dlq_with_a_reason_and_the_pipeline_goes_on(trained_model, tmp_path):
    settings = isolated_settings(trained_model)
    stream = simulate(200, 8, settings, 0.0, days=3, start=STREAM_START)
    paths = write_simulation(stream, tmp_path / "good.tsv")
    producer = make_producer(settings)
    bad = [
        b"\x00\xff random bytes",
        b'{"epc_code": "001.8805843.3842332.100006.20250701.000008002"}',
        b'{"epc_code": "x", "event_time": "yesterday", "location_id": "1", '
        b'"business_step": "Factory", "event_type": "Aggregation"}',
        b"[1, 2, 3]",
        b'{"epc_code": 5, "event_time": {"a": 1}}',
        b"{" + b'"pad": "' + b"x" * 100_000 + b'"}',
    ]
    for value in bad:
        producer.produce(settings.topic_scans, value=value)
    producer.flush(10)
    # Key and value together just over the producer's default message.max.bytes (the broker
    # takes up to ~1 MiB): such a message used to stop the detector at every start, unable to
    # forward it to the DLQ.
    huge = b'{"epc_code": "' + b"y" * 975_000 + b'"}'
    big_producer = make_producer(settings, **{"message.max.bytes": 1_048_000})
    big_producer.produce(settings.topic_scans, key=b"k" * 70_000, value=huge)
    assert big_producer.flush(10) == 0
    report = publish_scans(read_scans(paths["scans"]), settings, show_progress=False)

    result = run_detector(settings)
    assert result.returncode == 0, result.stderr[-3000:]
    dead = read_all(settings, settings.topic_dlq)
    limit = settings.max_message_bytes
    cut = {
        int(dict(m.headers())["truncated_from_bytes"]): m for m in dead if len(m.value()) == limit
    }
    originals = {len(v): v for v in [*bad, huge] if len(v) > limit}
    assert sorted(cut) == sorted(originals)  # the 100 kB message and the huge one, cut
    assert all(originals[size].startswith(m.value()) for size, m in cut.items())
    assert dict(cut[len(huge)].headers())["key_truncated_from_bytes"] == b"70000"
    whole = [m.value() for m in dead if len(m.value()) < limit]
    assert sorted(whole) == sorted(v for v in bad if len(v) <= limit)
    reasons = [dict(m.headers())["reason"].decode() for m in dead]
    assert any("not JSON" in r for r in reasons)
    assert any("missing required field event_time" in r for r in reasons)
    assert any("epc_code must be a string" in r for r in reasons)
    assert any("exceeds max_message_bytes" in r for r in reasons)
    assert 'scored": ' + str(report.published) in result.stderr or str(report.published) in (
        result.stderr
    )


def test_send_invalid_sends_what_was_read_and_only_reports_what_was_not(trained_model, tmp_path):
    settings = isolated_settings(trained_model)
    path = tmp_path / "bad.csv"
    path.write_text(
        "epc_code,location_id,business_step,event_type,event_time\n"
        "001.8805843.3842332.100006.20250701.000008002,12,Factory,Aggregation,not-a-time\n"
        "only,three,fields\n"
    )
    report = publish_scans(read_scans(path), settings, send_invalid=True, show_progress=False)
    assert [n for n, _ in report.bad_rows] == [2, 3]
    assert report.invalid_sent == report.published == 1
    [message] = read_all(settings, settings.topic_scans)
    assert b"not-a-time" in message.value()
