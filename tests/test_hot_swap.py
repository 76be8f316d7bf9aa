"""A promoted model takes over a running detector between batches; a broken one is refused."""

from __future__ import annotations

import json
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from detector.artifact import promote
from producer.publish import publish_scans
from producer.readers import read_scans
from producer.simulate import simulate, write_simulation
from tests.kafka_support import committed_all, isolated_settings, read_alerts, start_detector

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _copy_model(source: Path, root: Path, version: str) -> None:
    target = root / version
    shutil.copytree(source, target)
    meta = json.loads((target / "meta.json").read_text())
    meta["version"] = version
    (target / "meta.json").write_text(json.dumps(meta))


def _publish_and_wait(settings, path: Path) -> None:
    publish_scans(read_scans(path), settings, show_progress=False)
    deadline = time.monotonic() + 120
    while not committed_all(settings):
        assert time.monotonic() < deadline, "the detector did not catch up"
        time.sleep(1)


def test_promoted_model_takes_over_without_restart_and_broken_one_is_refused(
    trained_model, tmp_path
):
    root = tmp_path / "models"
    root.mkdir()
    _copy_model(trained_model, root, "v-one")
    promote(root, "v-one")
    settings = isolated_settings(root / "current", models_root=root)
    start = datetime(2025, 7, 20, tzinfo=UTC)
    first_sim = simulate(400, 51, settings, 0.1, days=3, start=start)
    first = write_simulation(first_sim, tmp_path / "a" / "first.tsv")
    second = write_simulation(
        simulate(400, 52, settings, 0.1, days=3, start=start), tmp_path / "b" / "second.tsv"
    )

    detector = start_detector(settings, model_check_s=0.5)
    try:
        _publish_and_wait(settings, first["scans"])
        before = read_alerts(settings)
        assert before and {a["model_version"] for a in before} == {"v-one"}

        _copy_model(trained_model, root, "v-broken")
        (root / "v-broken" / "model.pt").write_bytes(b"not a model")
        promote(root, "v-broken")
        time.sleep(3)
        assert detector.poll() is None, "a broken model must not stop the detector"

        _copy_model(trained_model, root, "v-two")
        promote(root, "v-two")
        time.sleep(3)
        _publish_and_wait(settings, second["scans"])
        seen = {a["alert_id"] for a in before}
        after = [a for a in read_alerts(settings) if a["alert_id"] not in seen]
        assert after and {a["model_version"] for a in after} == {"v-two"}
        assert detector.poll() is None
    finally:
        detector.terminate()
        detector.wait(60)
