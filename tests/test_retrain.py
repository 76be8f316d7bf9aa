"""The retrainer: requests become candidates, decisions are announced, worse models stay out.

Also `epcwatch models` and `epcwatch rollback` on a models root with kept versions.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from config import Settings
from detector.artifact import META_FILE, promote
from drift.monitor import DriftEvent
from drift.retrain import (
    EVALUATION_FILE,
    Evaluation,
    ModelUpdate,
    RetrainWorker,
    decide,
    train_candidate,
)
from epcwatch.cli import app
from producer.kafka import make_producer
from producer.simulate import locations_frame, simulate
from tests.kafka_support import REPO, isolated_settings, read_all, settings_env

runner = CliRunner()
STREAM_ITEMS = 2500
OLD_SCANS = 300


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """A current model trained on a little simulated history of the test network."""
    from detector.train import train_model

    settings = Settings(train_epochs_max=8)
    history = simulate(3000, 3, settings)
    records = [
        {k: v for k, v in r.items() if not k.startswith("_")}
        for r in history.rows_in_arrival_order()
    ]
    root = tmp_path_factory.mktemp("base-models")
    return train_model(
        records, settings, root, locations_frame(history.network), show_progress=False
    )


def models_root_with(model: Path, tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    shutil.copytree(model, root / model.name)
    promote(root, model.name)
    return root


def retrain_settings(root: Path, **overrides) -> Settings:
    tag = uuid.uuid4().hex[:8]
    return isolated_settings(
        root / "current",
        models_root=root,
        topic_models=f"t-{tag}-models",
        train_epochs_max=3,
        retrain_history_s=3600.0,
        **overrides,
    )


def publish_stream(settings: Settings) -> int:
    """Recent scans (message time now) plus older ones the history window must leave out."""
    producer = make_producer(settings)
    old_ms = int((time.time() - 2 * 86400) * 1000)
    for row in simulate(200, 11, settings).rows_in_arrival_order()[:OLD_SCANS]:
        record = {k: v for k, v in row.items() if not k.startswith("_")}
        producer.produce(
            settings.topic_scans,
            key=row["epc_code"].encode(),
            value=orjson.dumps(record),
            timestamp=old_ms,
        )
    recent = simulate(STREAM_ITEMS, 5, settings).rows_in_arrival_order()
    for row in recent:
        record = {k: v for k, v in row.items() if not k.startswith("_")}
        producer.produce(
            settings.topic_scans, key=row["epc_code"].encode(), value=orjson.dumps(record)
        )
        producer.poll(0)
    assert producer.flush(30) == 0
    return len(recent)


def request_retrain(settings: Settings, action: str = "retrain_requested") -> None:
    event = DriftEvent(
        drift_id=uuid.uuid4().hex,
        monitor="adwin",
        statistic="normal_scan_max_confidence",
        mean_before=0.01,
        mean_after=0.2,
        scans_seen=5000,
        event_time_from="2025-07-01T00:00:00+00:00",
        event_time_to="2025-07-02T00:00:00+00:00",
        detector_instance="test",
        model_version="v0",
        action=action,
        detected_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
    )
    producer = make_producer(settings)
    producer.produce(settings.topic_drift, key=b"test", value=event.model_dump_json().encode())
    assert producer.flush(10) == 0


def announced(settings: Settings) -> list[ModelUpdate]:
    return [
        ModelUpdate.model_validate_json(m.value())
        for m in read_all(settings, settings.topic_models)
    ]


@pytest.mark.slow
@pytest.mark.integration
def test_a_retrain_request_trains_a_candidate_promotes_and_announces_it(small_model, tmp_path):
    root = models_root_with(small_model, tmp_path)
    settings = retrain_settings(root, retrain_margin=1.0)
    recent = publish_stream(settings)
    request_retrain(settings, action="none (within retrain cooldown)")
    request_retrain(settings)
    env = settings_env(settings) | {
        "EPCWATCH_MODELS_ROOT": str(root),
        "EPCWATCH_TOPIC_MODELS": settings.topic_models,
        "EPCWATCH_TRAIN_EPOCHS_MAX": "3",
        "EPCWATCH_RETRAIN_HISTORY_S": "3600",
        "EPCWATCH_RETRAIN_MARGIN": "1.0",
    }

    done = subprocess.run(
        [sys.executable, "-m", "epcwatch", "retrain", "--once"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    [update] = announced(settings)
    assert update.decision == "promoted", update
    assert update.current_version == small_model.name
    assert update.candidate_version and update.candidate_version != small_model.name
    assert update.history_scans == recent  # the old scans are outside retrain_history_s
    assert 0.0 <= update.candidate_f1 <= 1.0 and 0.0 <= update.current_f1 <= 1.0
    assert set(update.per_type_f1["candidate"]) == {
        "epcFake",
        "epcDup",
        "locErr",
        "evtOrderErr",
        "jump",
    }
    assert (root / "current").resolve().name == update.candidate_version
    assert (root / update.candidate_version / EVALUATION_FILE).exists()
    assert f"promoted: {update.candidate_version}" in done.stdout


def worse_trainer(records, settings, root, locations) -> Path:
    """A real candidate, then sabotaged: it forgets every registered company prefix, so every
    item looks counterfeit to it."""
    path = train_candidate(records, settings, root, locations)
    reference = json.loads((path / "reference.json").read_text())
    reference["registered_prefixes"] = []
    (path / "reference.json").write_text(json.dumps(reference))
    return path


@pytest.mark.slow
@pytest.mark.integration
def test_a_worse_candidate_is_rejected_kept_on_disk_and_current_stays(small_model, tmp_path):
    root = models_root_with(small_model, tmp_path)
    settings = retrain_settings(root, retrain_margin=0.0)
    publish_stream(settings)
    request_retrain(settings)

    [update] = RetrainWorker(settings, trainer=worse_trainer).run(once=True)

    assert update.decision == "rejected", update
    assert update.candidate_f1 < update.current_f1
    assert update.current_f1 > 0.6
    assert update.candidate_false_alarm_rate > 0.9
    assert (root / "current").resolve().name == small_model.name
    assert (root / update.candidate_version / META_FILE).exists()
    assert [u.decision for u in announced(settings)] == ["rejected"]


class FakeMessage:
    def __init__(self, value: bytes, offset: int) -> None:
        self._value, self._offset = value, offset

    def value(self) -> bytes:
        return self._value

    def topic(self) -> str:
        return "drift"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def timestamp(self) -> tuple[int, int]:
        return (1, int(time.time() * 1000))


def test_a_storm_of_requests_trains_once_per_cooldown(monkeypatch):
    worker = RetrainWorker(Settings(drift_cooldown_s=600))
    trained: list[str | None] = []
    monkeypatch.setattr(worker, "retrain", lambda drift_id=None: trained.append(drift_id))
    now = datetime.now(UTC).isoformat()
    base = {
        "monitor": "adwin",
        "statistic": "s",
        "mean_before": 0.0,
        "mean_after": 0.1,
        "scans_seen": 1,
        "event_time_from": "",
        "event_time_to": "",
        "detector_instance": "d",
        "model_version": "v",
        "detected_at": now,
    }
    messages = [
        FakeMessage(orjson.dumps({**base, "drift_id": f"d{i}", "action": action}), i)
        for i, action in enumerate(["retrain_requested"] * 5 + ["none (within cooldown)"])
    ]
    messages.append(FakeMessage(b"not json", 99))

    for message in messages:
        worker.handle(message)

    assert trained == ["d0"]
    assert worker.skipped == 4


def test_decide_promotes_within_the_margin_and_rejects_beyond_it():
    def ev(f1: float) -> Evaluation:
        return Evaluation(f1, {}, 0.0, 100)

    assert decide(ev(0.90), ev(0.91), 0.02)[0]
    assert not decide(ev(0.88), ev(0.91), 0.02)[0]
    assert decide(ev(0.5), None, 0.0) == (True, "no current model")


def copy_version(model: Path, root: Path, version: str) -> None:
    shutil.copytree(model, root / version)
    meta = json.loads((root / version / META_FILE).read_text())
    meta["version"] = version
    (root / version / META_FILE).write_text(json.dumps(meta))


@pytest.mark.slow
def test_models_lists_versions_and_rollback_switches_current(small_model, tmp_path, monkeypatch):
    root = models_root_with(small_model, tmp_path)
    copy_version(small_model, root, "20990101T000000-00000000")
    promote(root, "20990101T000000-00000000")
    monkeypatch.setenv("EPCWATCH_MODELS_ROOT", str(root))

    listed = runner.invoke(app, ["models"])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert any(line.startswith("* 20990101T000000-00000000") for line in lines)
    assert any(line.startswith(f"  {small_model.name}") for line in lines)

    back = runner.invoke(app, ["rollback", small_model.name])
    assert back.exit_code == 0, back.output
    assert (root / "current").resolve().name == small_model.name

    unknown = runner.invoke(app, ["rollback", "19990101T000000-deadbeef"])
    assert unknown.exit_code == 1
    assert "no model version '19990101T000000-deadbeef'" in unknown.output
    assert (root / "current").resolve().name == small_model.name


@pytest.mark.parametrize("name", ["retrain", "models", "rollback"])
def test_new_subcommands_have_help_with_an_example(name):
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example: epcwatch" in result.output.replace("\n", " ").replace("│", "")
