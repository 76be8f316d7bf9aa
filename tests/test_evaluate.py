"""The evaluation's metrics on hand-made streams, masked features, and a tiny end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from config import Settings
from detector.artifact import load_model, save_model
from detector.calibration import PlattScaler
from detector.evaluate import (
    MODEL_ONLY_MASK,
    calibration_report,
    check_targets,
    confusion,
    label_stream,
    rules_only_flags,
    type_metrics,
)
from detector.features import FEATURE_NAMES, N_FEATURES, RULE_FEATURES
from detector.inject import Incident
from detector.model import ScanLSTM
from detector.schema import ANOMALY_TYPES
from tests.conftest import GOOD_EPC

T = {t: i for i, t in enumerate(ANOMALY_TYPES)}


def _stream():
    """Ten events: a clean EPC `c` (5 events), a jump on `j` (event 6 of 3), a clone on `d`."""
    epcs = ["c"] * 5 + ["j", "j", "j", "d", "d"]
    records = [{"eventId": f"e{i}", "epc_code": epc} for i, epc in enumerate(epcs)]
    incidents = [
        Incident("i0", "jump", "too_fast_hop", "j", [records[6]]),
        Incident("i1", "epcDup", "clone_read_elsewhere", "d", [records[8], records[9]]),
    ]
    return records, label_stream(records, incidents)


def test_labels_mark_incident_events_and_clean_epcs_only():
    _, truth = _stream()
    assert truth.clean.tolist() == [True] * 5 + [False] * 5
    assert truth.labels[:, T["jump"]].nonzero()[0].tolist() == [6]
    assert truth.labels[:, T["epcDup"]].nonzero()[0].tolist() == [8, 9]


def test_a_forged_code_makes_the_renamed_epc_anomalous():
    records = [{"eventId": "a", "epc_code": "fake"}, {"eventId": "b", "epc_code": "real"}]
    truth = label_stream(records, [Incident("i", "epcFake", "header", "fake", [records[0]])])
    assert truth.clean.tolist() == [False, True]


def test_duplicate_event_ids_are_refused():
    records = [{"eventId": "a", "epc_code": "x"}, {"eventId": "a", "epc_code": "y"}]
    with pytest.raises(ValueError, match="not unique"):
        label_stream(records, [])


def test_metrics_count_incidents_for_recall_and_alerts_for_precision():
    _, truth = _stream()
    flags = np.zeros((10, len(ANOMALY_TYPES)), dtype=bool)
    flags[6, T["jump"]] = True  # caught
    flags[7, T["jump"]] = True  # right EPC, wrong event: a wrong alert, not a false alarm
    flags[2, T["jump"]] = True  # a false alarm on a clean event
    flags[9, T["epcDup"]] = True  # one read of the clone is enough to catch it
    flags[4, T["locErr"]] = True  # a false alarm of a type with no incidents

    metrics = type_metrics(flags, truth)
    jump = metrics["per_type"]["jump"]
    assert (jump["incidents"], jump["caught"], jump["alerts"], jump["right_alerts"]) == (1, 1, 3, 1)
    assert jump["precision"] == pytest.approx(1 / 3)
    assert jump["recall"] == 1.0
    assert jump["f1"] == pytest.approx(0.5)
    assert jump["false_alarms"] == 1
    assert jump["false_alarms_per_10k"] == pytest.approx(1e4 / 5)
    dup = metrics["per_type"]["epcDup"]
    assert (dup["precision"], dup["recall"], dup["f1"]) == (1.0, 1.0, 1.0)
    loc = metrics["per_type"]["locErr"]
    assert (loc["incidents"], loc["precision"], loc["recall"], loc["f1"]) == (0, 0.0, 0.0, 0.0)
    assert metrics["false_alarm_events"] == 2
    assert metrics["false_alarms_per_10k"] == pytest.approx(1e4 * 2 / 5)
    assert metrics["macro_f1"] == pytest.approx((0.5 + 1.0) / 5)
    assert metrics["min_recall"] == 0.0


def test_a_missed_incident_lowers_recall():
    _, truth = _stream()
    flags = np.zeros((10, len(ANOMALY_TYPES)), dtype=bool)
    flags[7, T["jump"]] = True
    jump = type_metrics(flags, truth)["per_type"]["jump"]
    assert (jump["caught"], jump["recall"], jump["precision"]) == (0, 0.0, 0.0)


def test_confusion_rows_are_injected_types_and_clean_events():
    _, truth = _stream()
    flags = np.zeros((10, len(ANOMALY_TYPES)), dtype=bool)
    flags[6, T["locErr"]] = True
    flags[6, T["jump"]] = True
    flags[1, T["epcFake"]] = True
    table = confusion(flags, truth)
    assert table["jump"]["jump"] == 1 and table["jump"]["locErr"] == 1
    assert table["jump"]["nothing"] == 0
    assert table["epcDup"]["nothing"] == 1
    assert table["clean"]["epcFake"] == 1 and table["clean"]["nothing"] == 4
    assert table["locErr"] == dict.fromkeys((*ANOMALY_TYPES, "nothing"), 0)


def test_calibration_of_alerts_and_of_every_score():
    labels = np.zeros((4, len(ANOMALY_TYPES)), dtype=bool)
    labels[:2, 0] = True
    confidence = np.zeros((4, len(ANOMALY_TYPES)))
    confidence[:, 0] = [0.95, 0.95, 0.95, 0.05]
    flags = confidence >= 0.5
    report = calibration_report(confidence, flags, labels)
    assert report["alerts"] == 3
    assert report["ece_alerts"] == pytest.approx(0.95 - 2 / 3)
    assert report["ece_alerts_per_type"][ANOMALY_TYPES[0]] == pytest.approx(0.95 - 2 / 3)
    assert report["ece_all_scores"] == pytest.approx((3 * (0.95 - 2 / 3) + 0.05) / 20)
    assert sum(b["n"] for b in report["reliability_alerts"]) == 3


def test_targets_are_met_only_within_their_bounds():
    result = {
        "detectors": {
            "combined": {"macro_f1": 0.96, "min_recall": 0.92, "false_alarms_per_10k": 2.0}
        },
        "calibration": {"ece_alerts": 0.051},
    }
    met = {name: t["met"] for name, t in check_targets(result).items()}
    assert met == {
        "macro_f1_min": True,
        "recall_min": False,
        "false_alarms_per_10k_max": True,
        "ece_max": False,
    }


def test_rules_only_flags_both_reads_of_a_clone(reference, settings):
    records = [
        {
            "eventId": f"e{i}",
            "epc_code": GOOD_EPC,
            "event_time": t,
            "location_id": site,
            "business_step": step,
            "event_type": etype,
        }
        for i, (etype, step, site, t) in enumerate(
            [
                ("Aggregation", "Factory", "F1", "2025-07-01 08:00:00"),
                ("WMS_Inbound", "WMS", "W1", "2025-07-01 10:00:00"),
                ("WMS_Inbound", "WMS", "H1", "2025-07-01 10:00:30"),
            ]
        )
    ]
    flags = rules_only_flags(records, reference, settings)
    assert flags[:, T["epcDup"]].tolist() == [False, True, True]
    assert not flags[:, T["epcFake"]].any()


def test_model_only_mask_covers_every_rule_check():
    rule_columns = {FEATURE_NAMES[i] for cols in RULE_FEATURES.values() for i in cols}
    assert rule_columns <= set(MODEL_ONLY_MASK)
    assert "log_hop_over_bound" not in MODEL_ONLY_MASK


def test_masked_features_do_not_reach_the_lstm_and_survive_save_and_load(reference, tmp_path):
    masked = tuple(FEATURE_NAMES.index(n) for n in MODEL_ONLY_MASK)
    torch.manual_seed(0)
    net = ScanLSTM(N_FEATURES, 8, masked)
    x = torch.rand(3, 4, N_FEATURES)
    poked = x.clone()
    poked[..., list(masked)] = 5.0
    assert torch.equal(net(x), net(poked))

    scalers = {t: PlattScaler() for t in ANOMALY_TYPES}
    thresholds = dict.fromkeys(ANOMALY_TYPES, 0.5)
    path = save_model(
        tmp_path / "m", "v1", net, reference, scalers, thresholds, {}, {}, MODEL_ONLY_MASK
    )
    assert json.loads((path / "meta.json").read_text())["masked_features"] == list(MODEL_ONLY_MASK)
    loaded = load_model(path)
    h = torch.zeros(2, 8)
    first, _, _ = loaded.net.step(x[:2, 0], h, h)
    second, _, _ = loaded.net.step(poked[:2, 0], h, h)
    assert torch.equal(first, second)


def test_unmasked_model_is_unchanged_by_the_mask_machinery(reference, tmp_path):
    torch.manual_seed(0)
    net = ScanLSTM(N_FEATURES, 8)
    x = torch.rand(2, 3, N_FEATURES)
    scalers = {t: PlattScaler() for t in ANOMALY_TYPES}
    path = save_model(
        tmp_path / "m", "v1", net, reference, scalers, dict.fromkeys(ANOMALY_TYPES, 0.5), {}, {}
    )
    loaded = load_model(path)
    assert loaded.net.masked == ()
    assert torch.equal(loaded.net(x), net(x))


@pytest.mark.slow
def test_tiny_evaluation_writes_report_results_and_plot(tmp_path):
    from detector.evaluate import run_evaluation
    from producer import simulate as simulator

    settings = Settings(train_epochs_max=3)
    results = run_evaluation(
        simulator, settings, tmp_path, (5,), history_items=1500, stream_items=600, command="x"
    )
    network = results["networks"][0]
    assert set(network["detectors"]) == {"rules_only", "model_only", "combined"}
    assert network["stream"]["incidents"] >= 5
    assert set(network["targets"]) == {
        "macro_f1_min",
        "recall_min",
        "false_alarms_per_10k_max",
        "ece_max",
    }
    report = (tmp_path / "README.md").read_text()
    assert "| `jump` | combined |" in report
    assert json.loads((tmp_path / "results.json").read_text())["networks"][0]["network_seed"] == 5
    assert (tmp_path / "reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_command_has_help_with_an_example():
    from typer.testing import CliRunner

    from epcwatch.cli import app

    result = CliRunner().invoke(app, ["evaluate", "--help"])
    assert result.exit_code == 0, result.output
    assert "Example: epcwatch evaluate" in result.output.replace("\n", " ").replace("│", "")


@pytest.mark.slow
def test_a_long_history_trains_the_lstm_on_a_sample_and_learns_the_network_from_all(tmp_path):
    from detector.artifact import load_model
    from detector.train import train_model
    from producer.simulate import locations_frame, simulate

    settings = Settings(train_epochs_max=2, train_max_epcs=400)
    history = simulate(2000, 4, settings)
    records = [
        {k: v for k, v in r.items() if not k.startswith("_")}
        for r in history.rows_in_arrival_order()
    ]
    model = load_model(
        train_model(records, settings, tmp_path, locations_frame(history.network), False)
    )
    training = model.meta["training"]
    assert training["history_epcs"] >= 1900
    assert training["train_epcs"] == 300 and training["validation_epcs"] == 100
    unsampled = load_model(
        train_model(
            records,
            Settings(train_epochs_max=1),
            tmp_path,
            locations_frame(history.network),
            False,
        )
    )
    assert unsampled.meta["training"]["train_epcs"] > 1000
    # The network is learned from all of history either way.
    assert model.reference.route_support == unsampled.reference.route_support
    assert model.reference.route_bound_s == unsampled.reference.route_bound_s
