"""Running it like a service: metrics and health while it works, compose file sanity."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from producer.publish import publish_scans
from producer.readers import read_scans
from producer.simulate import simulate, write_simulation
from tests.kafka_support import REPO, committed_all, isolated_settings, start_detector

EXPECTED_METRICS = [
    "epcwatch_scans_consumed_total",
    "epcwatch_scans_scored_total",
    "epcwatch_alerts_total",
    "epcwatch_dead_letters_total",
    "epcwatch_late_scans_total",
    "epcwatch_batch_seconds_bucket",
    "epcwatch_consumer_lag",
    "epcwatch_tracked_epcs",
    "epcwatch_evicted_epcs",
    "epcwatch_drift_events_total",
    "epcwatch_model_info",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.integration
@pytest.mark.slow
def test_metrics_and_health_are_served_while_the_detector_works(trained_model, tmp_path):
    settings = isolated_settings(trained_model)
    stream = simulate(400, 41, settings, 0.1, days=3, start=datetime(2025, 7, 20, tzinfo=UTC))
    paths = write_simulation(stream, tmp_path / "stream.tsv")
    publish_scans(read_scans(paths["scans"]), settings, show_progress=False)
    port = _free_port()
    detector = start_detector(settings, metrics_port=port)
    try:
        deadline = time.monotonic() + 120
        while not committed_all(settings):
            assert time.monotonic() < deadline
            time.sleep(1)
        time.sleep(11)  # lag gauges refresh every 10 s
        status, body = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        for name in EXPECTED_METRICS:
            assert name in body, name
        assert 'epcwatch_alerts_total{anomaly_type="epcFake"' in body
        status, health = _get(f"http://127.0.0.1:{port}/health")
        assert status == 200 and '"healthy":true' in health
    finally:
        detector.terminate()
        assert detector.wait(60) == 0


def test_compose_file_has_the_services_and_a_scalable_detector():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"kafka", "topics", "model", "detector", "retrainer", "prometheus"} <= set(services)
    assert "container_name" not in services["detector"]  # --scale detector=3 needs this
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    prometheus = yaml.safe_load(Path(REPO / "deploy" / "prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["dns_sd_configs"][0]["port"] == 9400
