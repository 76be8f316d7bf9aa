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


def test_scoring_a_file_by_columns_gives_the_decisions_of_streaming_it(trained_model, tmp_path):
    """`score` takes a whole file in rounds (the k-th scan of every EPC at once); the detector
    takes batches as they come. Both must decide the same for every scan."""
    from datetime import UTC, datetime

    import numpy as np

    from detector.report import score_file
    from detector.schema import ANOMALY_TYPES, to_scan
    from producer.readers import read_scans
    from producer.simulate import simulate, write_simulation

    settings = Settings()
    stream = simulate(1500, 31, settings, 0.1, days=4, start=datetime(2025, 7, 20, tzinfo=UTC))
    path = write_simulation(stream, tmp_path / "stream.tsv")["scans"]
    with path.open("a") as handle:
        handle.write("not\ta\tscan\n")  # a bad row is reported by its line, not scored
    model = load_model(trained_model)
    frame, summary = score_file(path, model, settings, show_progress=False)

    records = [r for _, r in read_scans(path) if isinstance(r, dict)]
    scans = [to_scan(r) for r in records]
    inferencer = Inferencer(model, settings)
    table = inferencer.table()
    flags = np.zeros((len(scans), len(ANOMALY_TYPES)), dtype=bool)
    confidence = np.zeros(flags.shape, dtype=np.float32)
    row_of, dup = {}, ANOMALY_TYPES.index("epcDup")
    for start in range(0, len(scans), 700):
        batch = inferencer.score_batch(scans[start : start + 700], table)
        flags[start : start + 700], confidence[start : start + 700] = batch.flags, batch.confidence
        row_of.update((s.event_id, start + j) for j, s in enumerate(batch.scans))
        for j in np.flatnonzero(batch.flags[:, dup]).tolist():
            other = row_of[inferencer.featurizer.other_read(batch.featurized, j, table)[0]]
            flags[other, dup] = True
            confidence[other, dup] = max(confidence[other, dup], batch.confidence[j, dup])

    assert summary.invalid_rows == [(len(scans) + 2, "expected 19 columns, found 3")]
    assert frame["eventId"].tolist() == [s.event_id for s in scans]
    detected = frame[[f"{t}_detected" for t in ANOMALY_TYPES]].to_numpy().astype(bool)
    assert flags[:, dup].sum() > 0 and flags.any(axis=1).sum() > 100
    assert (detected == flags).all()
    scored = frame[[f"{t}_confidence" for t in ANOMALY_TYPES]].to_numpy(dtype=np.float32)
    assert np.abs(scored - confidence).max() < 1e-3
