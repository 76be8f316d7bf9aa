"""The published message schemas match the code that produces the messages."""

from __future__ import annotations

import json
from pathlib import Path

from detector.alert import Alert
from drift.monitor import DriftEvent

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_alert_schema_in_docs_is_current():
    assert json.loads((DOCS / "alert.schema.json").read_text()) == Alert.model_json_schema()


def test_drift_event_schema_in_docs_is_current():
    published = json.loads((DOCS / "drift-event.schema.json").read_text())
    assert published == DriftEvent.model_json_schema()
