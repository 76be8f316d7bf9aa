"""The command line: every subcommand's help, and `score` on both accepted file layouts."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from epcwatch.cli import app

runner = CliRunner()
SUBCOMMANDS = [
    "simulate",
    "produce",
    "train",
    "detect",
    "score",
    "evaluate",
    "retrain",
    "models",
    "rollback",
    "topics",
    "tail",
    "demo",
]


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help_with_an_example(name):
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example: epcwatch" in result.output.replace("\n", " ").replace("│", "")


def test_invalid_configuration_fails_fast_naming_the_setting(monkeypatch):
    monkeypatch.setenv("EPCWATCH_DUP_WINDOW_S", "-5")
    result = runner.invoke(app, ["topics"])
    assert result.exit_code == 2
    assert "dup_window_s" in result.output


def test_a_list_setting_that_is_not_json_fails_with_its_name_and_the_format(monkeypatch):
    monkeypatch.setenv("EPCWATCH_REGISTERED_PREFIXES", "8808271,8817611")  # a newcomer's guess
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 2
    assert "registered_prefixes" in result.output and "JSON" in result.output


def test_score_without_a_model_says_how_to_make_one(tmp_path: Path):
    scans = tmp_path / "s.tsv"
    scans.write_text("epc_code\tevent_time\n")
    result = runner.invoke(app, ["score", str(scans), "--model", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert "epcwatch train" in result.output


@pytest.mark.slow
def test_score_accepts_raw_tsv_and_partial_csv(trained_model, tmp_path: Path):
    sim_dir = tmp_path / "sim"
    out = runner.invoke(
        app,
        [
            "simulate",
            "-o",
            str(sim_dir / "raw.tsv"),
            "--items",
            "600",
            "--anomaly-share",
            "0.1",
            "--no-event-ids",
            "--seed",
            "4",
            "--start",
            "2025-07-20",
            "--days",
            "4",
        ],
    )
    assert out.exit_code == 0, out.output
    items = re.search(r"of (\d+) items", out.output).group(1)
    raw = sim_dir / "raw.tsv"
    report = tmp_path / "report.csv"
    result = runner.invoke(
        app, ["score", str(raw), "--model", str(trained_model), "-o", str(report)]
    )
    assert result.exit_code == 0, result.output
    assert "alert level:" in result.output and f"items analysed: {items}" in result.output
    with report.open() as handle:
        rows = list(csv.DictReader(handle))
    assert {"eventId", "epcFake_detected", "jump_confidence"} <= set(rows[0])
    labels = list(csv.DictReader((sim_dir / "raw.labels.csv").open()))
    flagged = {r["eventId"] for r in rows if r["jump_detected"] == "1"}
    jumps = {r["event_id"] for r in labels if r["anomaly_type"] == "jump"}
    assert jumps and jumps <= flagged

    partial = tmp_path / "partial.csv"
    keep = [
        "eventId",
        "epc_code",
        "location_id",
        "scan_location",
        "business_step",
        "event_type",
        "event_time",
        "product_name",
    ]
    with partial.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, keep)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in keep})
        writer.writerow({"eventId": "bad-1", "epc_code": "", "event_time": "2025-07-20"})
        writer.writerow(
            {
                "eventId": "bad-2",
                "epc_code": "x",
                "event_time": "not a time",
                "location_id": "1",
                "business_step": "Factory",
                "event_type": "Aggregation",
            }
        )
    result = runner.invoke(
        app, ["score", str(partial), "--model", str(trained_model), "-o", str(tmp_path / "r2.csv")]
    )
    assert result.exit_code == 0, result.output
    assert "missing required field epc_code" in result.output
    assert "event_time is not ISO 8601" in result.output
    assert f"items analysed: {items}" in result.output
