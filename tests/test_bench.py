"""The benchmark's pure helpers: percentiles, tables, names. No timings are asserted anywhere."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import pytest

from config import Settings
from epcwatch.bench import (
    _trigger_time,
    bench_settings,
    format_table,
    guarantee_settings,
    latency_summary,
    percentile,
    rate_text,
    result_file,
    summary_rows,
)


def test_percentile_interpolates_like_numpy() -> None:
    values = [10.0, 1.0, 4.0, 7.0]

    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 10.0
    assert percentile(values, 50) == pytest.approx(5.5)
    assert percentile(values, 99) == pytest.approx(9.91)


def test_percentile_of_nothing_is_nan_and_bad_q_is_refused() -> None:
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_latency_summary_counts_and_rounds() -> None:
    summary = latency_summary([1.04, 2.0, 3.0, 100.0])

    assert summary["count"] == 4
    assert summary["p50_ms"] == 2.5
    assert summary["max_ms"] == 100.0


def test_format_table_aligns_text_left_and_numbers_right() -> None:
    table = format_table([("raw", "120,000"), ("detector", "9")], ("measure", "scans/s"))

    assert table.splitlines() == [
        "measure   scans/s",
        "raw       120,000",
        "detector        9",
    ]


def test_rate_text_handles_missing_values() -> None:
    assert rate_text(1234.4) == "1,234"
    assert rate_text(math.nan) == "n/a"


def test_result_file_is_named_by_start_time() -> None:
    started = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    assert result_file(Path("r"), started) == Path("r/2026-01-02T030405Z.json")


def test_bench_topics_are_its_own_and_guarantees_share_only_the_input() -> None:
    settings = bench_settings(Settings(), "abc")
    exactly_once = guarantee_settings(settings, "exactly_once")

    assert settings.topic_scans == "bench-abc-scans"
    assert settings.topic_alerts == "bench-abc-alerts"
    assert settings.group_id == "bench-abc-detector"
    assert exactly_once.topic_scans == settings.topic_scans
    assert exactly_once.topic_alerts != settings.topic_alerts
    assert exactly_once.processing_guarantee == "exactly_once"


def test_a_mirrored_clone_alert_is_timed_from_the_later_read() -> None:
    sent = {"first": 100.0, "second": 130.0}
    mirrored = {"event_id": "first", "explanation": {"evidence": {"other_event_id": "second"}}}

    assert _trigger_time(mirrored, sent) == 130.0
    assert _trigger_time({"event_id": "first", "explanation": {}}, sent) == 100.0
    assert _trigger_time({"event_id": "unknown"}, sent) is None


def test_summary_rows_say_when_exactly_once_is_not_available() -> None:
    results = {
        "stream": {"scans": 1000, "epcs": 200},
        "publish": {"rate_per_s": 5000.0},
        "raw_consume": {"rate_per_s": 100_000.0},
        "detector_at_least_once": {
            "available": True,
            "rate_per_s": 25_000.0,
            "peak_rss_mb": 700.0,
            "tracked_epcs": 200,
            "rss_bytes_per_epc": 900,
        },
        "detector_exactly_once": {"available": False, "reason": "not yet"},
    }

    rows = {measure: value for measure, value, _ in summary_rows(results)}

    assert rows["detector at-least-once (scans/s)"] == "25,000 (25% of raw)"
    assert rows["detector exactly-once (scans/s)"] == "not available"


@pytest.mark.integration
@pytest.mark.slow
def test_a_small_bench_run_measures_every_phase_and_leaves_no_topics(trained_model, tmp_path):
    from confluent_kafka.admin import AdminClient

    from epcwatch.bench import BenchOptions, run_bench

    settings = Settings(model_dir=trained_model)
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    before = set(admin.list_topics(timeout=10).topics)
    options = BenchOptions(scans=3000, latency_s=0, train_scans=0, results_dir=tmp_path)
    results = run_bench(settings, options)

    scans = results["stream"]["scans"]
    assert scans >= 3000 and results["raw_consume"]["scans"] == scans
    for guarantee in ("at_least_once", "exactly_once"):
        run = results[f"detector_{guarantee}"]
        assert (run["scans"], run["scored"]) == (scans, scans)
        assert run["alerts"] > 0 and run["rate_per_s"] > 0
    # Every window the throughput run ended with is in its changelog, and comes back.
    tracked = results["detector_at_least_once"]["tracked_epcs"]
    assert results["restore"]["windows"] == tracked
    assert results["restore"]["records"] >= tracked
    assert results["score"]["scans"] == scans
    rows = {measure for measure, _, _ in summary_rows(results)}
    assert any(measure.startswith("restore ") for measure in rows)
    after = set(admin.list_topics(timeout=10).topics)
    assert not [t for t in after - before if t.startswith("bench-")]  # its own are deleted
