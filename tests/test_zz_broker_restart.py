"""The broker goes away for 20 s mid-stream; the detector recovers by itself, nothing is lost.

This test stops and restarts the broker, so it runs last and only where the broker was started
from this checkout by `make kafka-up` (as in CI) and the run allows it (`CI` or
`EPCWATCH_TEST_BROKER_RESTART` set): on a developer's shared broker it would disturb other work.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from datetime import UTC, datetime

import pytest

from producer.publish import publish_scans
from producer.readers import read_scans
from producer.simulate import simulate, write_simulation
from tests.kafka_support import (
    REPO,
    check_alerts_against_labels,
    committed_all,
    isolated_settings,
    read_alerts,
    start_detector,
    wait_until_consuming,
)

PIDFILE = REPO / ".cache" / "kafka" / "broker.pid"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        not PIDFILE.exists()
        or not (os.environ.get("CI") or os.environ.get("EPCWATCH_TEST_BROKER_RESTART")),
        reason="needs a broker started by this checkout and CI or EPCWATCH_TEST_BROKER_RESTART",
    ),
]


def test_broker_down_for_twenty_seconds_mid_stream_loses_nothing(trained_model, tmp_path):
    settings = isolated_settings(trained_model, batch_max_messages=300)
    stream = simulate(1500, 31, settings, 0.06, days=4, start=datetime(2025, 7, 20, tzinfo=UTC))
    paths = write_simulation(stream, tmp_path / "stream.tsv")
    publisher = threading.Thread(
        target=publish_scans,
        args=(read_scans(paths["scans"]), settings),
        kwargs={"rate_per_s": 600, "show_progress": False},
        daemon=True,
    )
    publisher.start()
    detector = start_detector(settings)
    wait_until_consuming(detector)
    time.sleep(3)
    subprocess.run(["bash", "kafka/kafka-down.sh"], cwd=REPO, check=True, timeout=120)
    time.sleep(20)
    subprocess.run(["bash", "kafka/kafka-up.sh"], cwd=REPO, check=True, timeout=180)
    publisher.join(300)
    deadline = time.monotonic() + 300
    while not committed_all(settings):
        assert detector.poll() is None, "the detector died while the broker was away"
        assert time.monotonic() < deadline, "the detector never caught up"
        time.sleep(2)
    detector.send_signal(signal.SIGTERM)
    assert detector.wait(60) == 0
    check_alerts_against_labels(read_alerts(settings), stream.incidents)
