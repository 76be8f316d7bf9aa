"""The inferencer's decisions on inputs unlike anything in training."""

from __future__ import annotations

import pytest

from config import Settings
from detector.artifact import load_model
from detector.inferencer import Inferencer
from tests.conftest import make_scan

pytestmark = pytest.mark.slow


def test_unknown_site_and_bad_code_still_flags_counterfeit_and_nothing_else(trained_model):
    inferencer = Inferencer(load_model(trained_model), Settings())
    windows = inferencer.table()
    scans = [
        make_scan("Aggregation", "Factory", "999", "2025-07-20 02:13:00", epc="ABC"),
        make_scan("WMS_Inbound", "WMS", "1", "2025-07-20 05:13:00", epc="x"),
    ]
    verdicts = inferencer.score(scans, windows)
    assert [v.flagged for v in verdicts] == [("epcFake",), ("epcFake",)]
    assert all(v.confidence[0] >= 0.9 for v in verdicts)


def test_a_model_score_without_rule_evidence_raises_nothing(trained_model):
    inferencer = Inferencer(load_model(trained_model), Settings())
    inferencer.thresholds[:] = 0.0  # the model alone would flag every type everywhere
    epc = "001.8805843.3842332.100006.20250701.000008002"
    verdicts = inferencer.score(
        [make_scan("Aggregation", "Factory", "999", "2025-07-20 02:13:00", epc=epc)],
        inferencer.table(),
    )
    assert set(verdicts[0].flagged) <= {"epcFake"}  # its company is not registered


def test_scoring_a_file_in_shards_by_epc_gives_the_one_process_report(
    trained_model, tmp_path, monkeypatch
):
    from datetime import UTC, datetime

    import detector.report as report
    from producer.simulate import simulate, write_simulation

    settings = Settings()
    stream = simulate(1500, 31, settings, 0.1, days=4, start=datetime(2025, 7, 20, tzinfo=UTC))
    path = write_simulation(stream, tmp_path / "stream.tsv")["scans"]
    with path.open("a") as handle:
        handle.write("not\ta\tscan\n")  # a bad row is reported once, by its line
    model = load_model(trained_model)
    one, one_summary = report.score_file(path, model, settings, workers=1, show_progress=False)
    monkeypatch.setattr(report, "PARALLEL_MIN_BYTES", 0)
    two, two_summary = report.score_file(path, model, settings, workers=2, show_progress=False)
    assert one_summary.invalid_rows and two_summary.invalid_rows == one_summary.invalid_rows
    assert one_summary.flagged_items > 0
    assert two.equals(one)
