"""Measuring detection on data the model never saw: simulated networks, held-out labelled streams.

For each network, history is simulated and two models are trained on it: the normal one
(combined: rule checks and learned features) and one that never sees the rule-check columns
(model-only). A separate stream on the same network, with a later start and other journeys,
gets injected incidents and is scored by both models and by the rule checks alone. An incident
is caught when one of its events carries its type; precision counts alerts (events flagged
with a type) that are right; false alarms are alerts on events of EPCs with no incident.

The simulator is passed in (`producer.simulate` provides it), so this module keeps to the
package's imports: `detector` never imports `producer`.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import structlog

from config import Settings
from detector.artifact import load_model
from detector.calibration import reliability
from detector.features import FEATURE_NAMES, RULE_FEATURES, Featurizer
from detector.inferencer import Inferencer
from detector.inject import Incident
from detector.reference import Reference
from detector.report import SCORE_BATCH, score_records
from detector.schema import ANOMALY_TYPES, to_scan
from detector.train import rule_flags, train_model

log = structlog.get_logger(__name__)

DETECTORS = ("rules_only", "model_only", "combined")
DETECTOR_WORDS = {"rules_only": "rules only", "model_only": "LSTM only", "combined": "combined"}
# The model-only LSTM never sees the rule checks, nor the clone closeness that only a fired
# clone check sets; it keeps hop times, route and origin support, event types and tiers.
MODEL_ONLY_MASK: tuple[str, ...] = tuple(
    sorted(
        {FEATURE_NAMES[i] for columns in RULE_FEATURES.values() for i in columns}
        | {"dup_closeness"},
        key=FEATURE_NAMES.index,
    )
)
# Network shapes, chosen by the network seed (seed 1 the first, 2 the second, ...; in turn
# beyond): each differs in sites, companies, route fan-out and hop-time scale. By seed, not by
# position, so `--seeds 2` alone evaluates the same network as the second of `--seeds 1,2,3`.
NETWORK_SHAPES: tuple[dict[str, Any], ...] = (
    {},
    {
        "factories": 6,
        "hubs": 4,
        "wholesalers": 8,
        "retailers": 48,
        "companies": 5,
        "hubs_per_warehouse": 1,
        "suppliers_per_retailer": 3,
        "hop_time_scale": 1.8,
    },
    {
        "factories": 3,
        "hubs": 8,
        "wholesalers": 16,
        "retailers": 24,
        "companies": 2,
        "hubs_per_warehouse": 3,
        "suppliers_per_retailer": 1,
        "hop_time_scale": 0.6,
    },
)
HISTORY_START = datetime(2025, 7, 1, tzinfo=UTC)
HISTORY_DAYS = 14.0
# History is never spotless: a few unlabelled anomalies in it must not become normal.
HISTORY_ANOMALY_SHARE = 0.01
STREAM_START = datetime(2025, 7, 22, tzinfo=UTC)
STREAM_DAYS = 7.0
STREAM_ANOMALY_SHARE = 0.05
TARGETS = {
    "macro_f1_min": 0.95,
    "recall_min": 0.93,
    "false_alarms_per_10k_max": 2.0,
    "ece_max": 0.05,
}
REPORT_FILE = "README.md"
RESULTS_FILE = "results.json"
PLOT_FILE = "reliability.png"


class Simulator(Protocol):
    """What the evaluation needs from a simulator module."""

    NetworkShape: Callable[..., Any]

    def simulate(
        self,
        items: int,
        seed: int,
        settings: Settings,
        anomaly_share: float = 0.0,
        days: float = 14.0,
        start: datetime | None = None,
        shape: Any = None,
        network_seed: int = 1,
    ) -> Any: ...

    def locations_frame(self, network: Any) -> pd.DataFrame: ...


@dataclass
class LabelledStream:
    """Ground truth of a scored stream, aligned with its events in arrival order."""

    labels: np.ndarray  # (events, types) bool: the event carries an injected incident's type
    clean: np.ndarray  # (events,) bool: the event's EPC has no incident
    incidents: list[tuple[str, np.ndarray]]  # (anomaly type, indices of its events)


def raw_records(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Simulator rows as a scan file would carry them (without the private `_` fields)."""
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def label_stream(
    records: Sequence[dict[str, Any]], incidents: Sequence[Incident]
) -> LabelledStream:
    """Align incidents with the events of `records` (matched by `eventId`)."""
    index = {r["eventId"]: i for i, r in enumerate(records)}
    if len(index) != len(records):
        raise ValueError("event ids of the stream are not unique; labels would be ambiguous")
    labels = np.zeros((len(records), len(ANOMALY_TYPES)), dtype=bool)
    anomalous: set[str] = set()
    found: list[tuple[str, np.ndarray]] = []
    for incident in incidents:
        events = np.array([index[r["eventId"]] for r in incident.rows], dtype=np.int64)
        labels[events, ANOMALY_TYPES.index(incident.anomaly_type)] = True
        anomalous.add(incident.epc)
        anomalous.update(r["epc_code"] for r in incident.rows)
        found.append((incident.anomaly_type, events))
    clean = np.array([r["epc_code"] not in anomalous for r in records], dtype=bool)
    return LabelledStream(labels, clean, found)


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def type_metrics(flags: np.ndarray, truth: LabelledStream) -> dict[str, Any]:
    """Per type: incidents caught, alerts that are right, F1, false alarms on clean events.

    >>> truth = label_stream(
    ...     [{"eventId": "a", "epc_code": "x"}, {"eventId": "b", "epc_code": "y"}],
    ...     [Incident("i", "jump", "v", "x", [{"eventId": "a", "epc_code": "x"}])],
    ... )
    >>> flags = np.zeros((2, len(ANOMALY_TYPES)), bool)
    >>> flags[:, ANOMALY_TYPES.index("jump")] = True
    >>> m = type_metrics(flags, truth)["per_type"]["jump"]
    >>> m["recall"], m["precision"], m["false_alarms_per_10k"]
    (1.0, 0.5, 10000.0)
    """
    clean_events = int(truth.clean.sum())
    per_type: dict[str, dict[str, float]] = {}
    for k, anomaly_type in enumerate(ANOMALY_TYPES):
        events = [ev for t, ev in truth.incidents if t == anomaly_type]
        caught = sum(1 for ev in events if flags[ev, k].any())
        alerts = int(flags[:, k].sum())
        right = int((flags[:, k] & truth.labels[:, k]).sum())
        false_alarms = int((flags[:, k] & truth.clean).sum())
        precision, recall = _ratio(right, alerts), _ratio(caught, len(events))
        per_type[anomaly_type] = {
            "incidents": len(events),
            "caught": caught,
            "alerts": alerts,
            "right_alerts": right,
            "precision": precision,
            "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall),
            "false_alarms": false_alarms,
            "false_alarms_per_10k": 1e4 * _ratio(false_alarms, clean_events),
        }
    flagged_clean = int((flags & truth.clean[:, None]).any(axis=1).sum())
    return {
        "per_type": per_type,
        "macro_f1": float(np.mean([m["f1"] for m in per_type.values()])),
        "min_recall": min(m["recall"] for m in per_type.values()),
        "clean_events": clean_events,
        "false_alarm_events": flagged_clean,
        "false_alarms_per_10k": 1e4 * _ratio(flagged_clean, clean_events),
    }


def confusion(flags: np.ndarray, truth: LabelledStream) -> dict[str, dict[str, int]]:
    """Rows: injected type (incidents) and `clean` (events); columns: types raised on them.

    An incident counts once in every type raised on any of its events, or under `nothing`.
    """
    columns = (*ANOMALY_TYPES, "nothing")
    table = {t: dict.fromkeys(columns, 0) for t in ANOMALY_TYPES}
    for anomaly_type, events in truth.incidents:
        raised = flags[events].any(axis=0)
        for k, detected in enumerate(ANOMALY_TYPES):
            table[anomaly_type][detected] += int(raised[k])
        table[anomaly_type]["nothing"] += int(not raised.any())
    clean = flags[truth.clean]
    table["clean"] = {t: int(clean[:, k].sum()) for k, t in enumerate(ANOMALY_TYPES)}
    table["clean"]["nothing"] = int((~clean.any(axis=1)).sum())
    return table


def calibration_report(
    confidence: np.ndarray, flags: np.ndarray, labels: np.ndarray
) -> dict[str, Any]:
    """ECE and reliability tables of the alerts, per type and overall, and of every score."""
    ece_alerts, table_alerts = reliability(confidence[flags], labels[flags].astype(float))
    ece_all, table_all = reliability(confidence.ravel(), labels.ravel().astype(float))
    per_type = {}
    for k, anomaly_type in enumerate(ANOMALY_TYPES):
        chosen = flags[:, k]
        per_type[anomaly_type] = reliability(confidence[chosen, k], labels[chosen, k] * 1.0)[0]
    return {
        "ece_alerts": ece_alerts,
        "alerts": int(flags.sum()),
        "reliability_alerts": table_alerts,
        "ece_alerts_per_type": per_type,
        "ece_all_scores": ece_all,
        "reliability_all_scores": table_all,
    }


def rules_only_flags(
    records: Sequence[dict[str, Any]], reference: Reference, settings: Settings
) -> np.ndarray:
    """The rule checks alone over a stream; a clone check also flags the read it pairs with."""
    featurizer = Featurizer(reference, settings)
    table = featurizer.table()
    scans = [to_scan(record, settings.site_timezone) for record in records]
    done = featurizer.batch(table, scans)
    flags = rule_flags(done.x)
    row_of = {scan.event_id: i for i, scan in enumerate(scans)}
    dup = ANOMALY_TYPES.index("epcDup")
    for i in np.flatnonzero(flags[:, dup]).tolist():
        other = row_of.get(featurizer.other_read(done, i, table)[0])
        if other is not None:
            flags[other, dup] = True
    return flags


def model_verdicts(
    records: Sequence[dict[str, Any]], model_dir: Path, settings: Settings
) -> tuple[np.ndarray, np.ndarray]:
    """Flags and calibrated confidences of a model over a stream, as `epcwatch score` gives."""
    model = load_model(model_dir)
    frame, _ = score_records(enumerate(records, 1), model, settings, show_progress=False)
    if len(frame) != len(records):
        raise ValueError(f"{len(records) - len(frame)} stream events were not scored")
    flags = frame[[f"{t}_detected" for t in ANOMALY_TYPES]].to_numpy().astype(bool)
    confidence = frame[[f"{t}_confidence" for t in ANOMALY_TYPES]].to_numpy(dtype=np.float64)
    return flags, confidence


def ungated_model_flags(
    records: Sequence[dict[str, Any]], model_dir: Path, settings: Settings
) -> np.ndarray:
    """Flags of a model on its confidence alone, without the rule gate the detector applies.

    A clone flagged on its later read also flags the earlier read, as the detector does.
    """
    inferencer = Inferencer(load_model(model_dir), settings, rules_gate=False)
    table = inferencer.table()
    flags = np.zeros((len(records), len(ANOMALY_TYPES)), dtype=bool)
    row_of: dict[str, int] = {}
    dup = ANOMALY_TYPES.index("epcDup")
    for start in range(0, len(records), SCORE_BATCH):
        scans = [to_scan(r, settings.site_timezone) for r in records[start : start + SCORE_BATCH]]
        batch = inferencer.score_batch(scans, table)
        flags[start : start + len(scans)] = batch.flags
        for j, scan in enumerate(scans):
            row_of[scan.event_id] = start + j
        for j in np.flatnonzero(batch.flags[:, dup] & batch.featurized.found[:, dup]).tolist():
            other = row_of.get(inferencer.featurizer.other_read(batch.featurized, j, table)[0])
            if other is not None:
                flags[other, dup] = True
    return flags


def evaluate_network(
    simulator: Simulator,
    network_seed: int,
    shape: dict[str, Any],
    history_items: int,
    stream_items: int,
    settings: Settings,
    workdir: Path,
) -> dict[str, Any]:
    """Train on one network's history, score a later labelled stream, measure all three."""
    started = time.monotonic()
    network_shape = simulator.NetworkShape(**shape)
    history = simulator.simulate(
        history_items,
        100 + network_seed,
        settings,
        HISTORY_ANOMALY_SHARE,
        HISTORY_DAYS,
        HISTORY_START,
        network_shape,
        network_seed,
    )
    locations = simulator.locations_frame(history.network)
    history_records = raw_records(history.rows_in_arrival_order())
    models = {
        "combined": train_model(
            history_records, settings, workdir / "combined", locations, show_progress=False
        ),
        "model_only": train_model(
            history_records,
            settings,
            workdir / "model_only",
            locations,
            show_progress=False,
            masked_features=MODEL_ONLY_MASK,
        ),
    }
    log.info("evaluation_models_trained", network_seed=network_seed, seconds=_since(started))

    stream = simulator.simulate(
        stream_items,
        200 + network_seed,
        settings,
        STREAM_ANOMALY_SHARE,
        STREAM_DAYS,
        STREAM_START,
        network_shape,
        network_seed,
    )
    records = raw_records(stream.rows_in_arrival_order())
    truth = label_stream(records, stream.incidents)
    combined_flags, confidence = model_verdicts(records, models["combined"], settings)
    model_only_flags = ungated_model_flags(records, models["model_only"], settings)
    reference = load_model(models["combined"]).reference
    flags = {
        "rules_only": rules_only_flags(records, reference, settings),
        "model_only": model_only_flags,
        "combined": combined_flags,
    }
    result = {
        "network_seed": network_seed,
        "shape": {**vars(network_shape)},
        "sites": len(history.network.sites),
        "history": {
            "items": history_items,
            "scans": len(history_records),
            "unlabelled_incidents": len(history.incidents),
        },
        "stream": {
            "items": stream_items,
            "events": len(records),
            "clean_events": int(truth.clean.sum()),
            "incidents": len(stream.incidents),
        },
        "detectors": {name: type_metrics(flags[name], truth) for name in DETECTORS},
        "confusion": {name: confusion(flags[name], truth) for name in DETECTORS},
        "calibration": calibration_report(confidence, combined_flags, truth.labels),
        "model_versions": {name: path.name for name, path in models.items()},
        "seconds": _since(started),
    }
    result["targets"] = check_targets(result)
    log.info(
        "evaluation_network_done",
        network_seed=network_seed,
        macro_f1=round(result["detectors"]["combined"]["macro_f1"], 4),
        seconds=result["seconds"],
    )
    return result


def check_targets(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target of the combined detector with its measured value and whether it is met."""
    combined = result["detectors"]["combined"]
    measured = {
        "macro_f1_min": combined["macro_f1"],
        "recall_min": combined["min_recall"],
        "false_alarms_per_10k_max": combined["false_alarms_per_10k"],
        "ece_max": result["calibration"]["ece_alerts"],
    }
    return {
        name: {
            "target": bound,
            "measured": measured[name],
            "met": measured[name] <= bound if name.endswith("_max") else measured[name] >= bound,
        }
        for name, bound in TARGETS.items()
    }


def _since(started: float) -> float:
    return round(time.monotonic() - started, 1)


def run_evaluation(
    simulator: Simulator,
    settings: Settings,
    out: Path,
    network_seeds: Sequence[int] = (1, 2, 3),
    history_items: int = 16000,
    stream_items: int = 10000,
    command: str = "",
) -> dict[str, Any]:
    """Evaluate every network and write the report, the results and the reliability plot."""
    started = time.monotonic()
    networks = []
    with tempfile.TemporaryDirectory(prefix="epcwatch-eval-") as tmp:
        for seed in network_seeds:
            shape = NETWORK_SHAPES[(seed - 1) % len(NETWORK_SHAPES)]
            workdir = Path(tmp) / f"network-{seed}"
            networks.append(
                evaluate_network(
                    simulator, seed, shape, history_items, stream_items, settings, workdir
                )
            )
    results = {
        "command": command,
        "settings": {"seed": settings.seed, "lstm_hidden_size": settings.lstm_hidden_size},
        "history_anomaly_share": HISTORY_ANOMALY_SHARE,
        "stream_anomaly_share": STREAM_ANOMALY_SHARE,
        "model_only_masked_features": list(MODEL_ONLY_MASK),
        "targets": TARGETS,
        "all_targets_met": all(
            t["met"] for network in networks for t in network["targets"].values()
        ),
        "networks": networks,
        "seconds": _since(started),
    }
    write_outputs(results, out)
    return results


def write_outputs(results: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "results": out / RESULTS_FILE,
        "report": out / REPORT_FILE,
        "plot": out / PLOT_FILE,
    }
    paths["results"].write_text(json.dumps(results, indent=1) + "\n")
    paths["report"].write_text(render_markdown(results))
    plot_reliability(results, paths["plot"])
    log.info("evaluation_written", **{k: str(v) for k, v in paths.items()})
    return paths


def plot_reliability(results: dict[str, Any], path: Path) -> None:
    """Reliability of the combined model's confidences: alerts and every score, per network."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharey=True)
    panels = (("reliability_alerts", "alerts (flagged scores)"), ("reliability_all_scores", "all"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
        for network in results["networks"]:
            table = network["calibration"][key]
            ax.plot(
                [b["mean_confidence"] for b in table],
                [b["share_real"] for b in table],
                marker="o",
                label=f"network {network['network_seed']}",
            )
        ax.set_title(f"Reliability: {title}")
        ax.set_xlabel("mean confidence in bin")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of real anomalies")
    axes[0].legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(value: float) -> str:
    return f"{value:.3f}"


def render_markdown(results: dict[str, Any]) -> str:
    """The evaluation report for people."""
    settings = results["settings"]
    lines = [
        "# epcwatch evaluation",
        "",
        "Generated by `epcwatch evaluate`; every number below was measured in that run.",
        "",
        f"Reproduce: `{results['command']}` ({results['seconds']:.0f} s on the machine it ran "
        f"on). Training seed {settings['seed']}, LSTM hidden size "
        f"{settings['lstm_hidden_size']}.",
        "",
        "## Method",
        "",
        "- Per network: history is simulated (with "
        f"{results['history_anomaly_share']:.0%} of items carrying an anomaly nobody labels, "
        "as real history does) and two models are trained on it (`combined`, the "
        "normal model; `model_only`, the same LSTM with the rule-check feature columns zeroed in "
        "training and at inference, flagging on its calibrated confidence alone, without the "
        "rule gate the detector applies). A separate stream on the same network (other journeys, a "
        f"later period, {results['stream_anomaly_share']:.0%} of items given one injected "
        "incident) is scored by both and by the rule checks alone (`rules_only`).",
        "- Recall: an incident is caught when one of its events carries its type (a clone's "
        "earlier read is flagged when the later one arrives). Precision: alerts (events flagged "
        "with a type) that carry that type. F1 from the two. False alarms: alerts on events of "
        "EPCs without any incident, per 10,000 such clean events.",
        "- Calibration: expected calibration error (10 equal-width bins) of the combined "
        "model's confidences on its alerts (the target), and of every (event, type) score.",
        f"- Masked for `model_only`: {', '.join(results['model_only_masked_features'])}.",
        "",
        "## Targets (combined detector)",
        "",
        "| network | macro-F1 ≥ 0.95 | min recall ≥ 0.93 | false alarms / 10k ≤ 2 | ECE ≤ 0.05 |",
        "|---|---|---|---|---|",
    ]
    for network in results["networks"]:
        cells = [
            f"{_pct(t['measured'])} {'met' if t['met'] else '**missed**'}"
            for t in network["targets"].values()
        ]
        lines.append(f"| {network['network_seed']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "All targets met." if results["all_targets_met"] else "**Not every target is met.**",
        "",
        f"![reliability of the combined model's confidences]({PLOT_FILE})",
        "",
    ]
    for network in results["networks"]:
        lines += _network_section(network)
    return "\n".join(lines) + "\n"


def _network_section(network: dict[str, Any]) -> list[str]:
    shape = ", ".join(f"{k}={v}" for k, v in network["shape"].items())
    stream = network["stream"]
    lines = [
        f"## Network {network['network_seed']}",
        "",
        f"Shape: {shape} ({network['sites']} sites). History: {network['history']['items']} "
        f"items, {network['history']['scans']} scans, "
        f"{network['history']['unlabelled_incidents']} unlabelled incidents. "
        f"Stream: {stream['items']} items, "
        f"{stream['events']} events ({stream['clean_events']} clean), "
        f"{stream['incidents']} incidents. Took {network['seconds']:.0f} s.",
        "",
        "### Per type and detector",
        "",
        "| type | detector | incidents | caught | precision | recall | F1 | false alarms / 10k |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for anomaly_type in ANOMALY_TYPES:
        for name in DETECTORS:
            m = network["detectors"][name]["per_type"][anomaly_type]
            lines.append(
                f"| `{anomaly_type}` | {DETECTOR_WORDS[name]} | {m['incidents']} | {m['caught']} "
                f"| {_pct(m['precision'])} | {_pct(m['recall'])} | {_pct(m['f1'])} "
                f"| {m['false_alarms_per_10k']:.2f} |"
            )
    lines += [
        "",
        "| detector | macro-F1 | min recall | clean events with any alert / 10k |",
        "|---|---|---|---|",
    ]
    for name in DETECTORS:
        d = network["detectors"][name]
        lines.append(
            f"| {DETECTOR_WORDS[name]} | {_pct(d['macro_f1'])} | {_pct(d['min_recall'])} "
            f"| {d['false_alarms_per_10k']:.2f} |"
        )
    lines += ["", "### Confusion (combined)", ""]
    lines += _confusion_table(network["confusion"]["combined"])
    calibration = network["calibration"]
    lines += [
        "",
        "### Calibration (combined)",
        "",
        f"ECE of alerts: {calibration['ece_alerts']:.4f} over {calibration['alerts']} alerts "
        f"(per type: "
        + ", ".join(f"`{t}` {v:.4f}" for t, v in calibration["ece_alerts_per_type"].items())
        + f"); ECE of every score: {calibration['ece_all_scores']:.4f}.",
        "",
        "| confidence bin | alerts | mean confidence | share real |",
        "|---|---|---|---|",
    ]
    for b in calibration["reliability_alerts"]:
        lines.append(
            f"| {b['low']:.1f}–{b['high']:.1f} | {b['n']} | {b['mean_confidence']:.3f} "
            f"| {b['share_real']:.3f} |"
        )
    lines.append("")
    return lines


def _confusion_table(table: dict[str, dict[str, int]]) -> list[str]:
    columns = (*ANOMALY_TYPES, "nothing")
    lines = [
        "Rows: injected type (incidents; `clean`: clean events); columns: types raised on them.",
        "",
        "| injected \\ raised | " + " | ".join(f"`{c}`" for c in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for row, counts in table.items():
        lines.append(f"| `{row}` | " + " | ".join(str(counts[c]) for c in columns) + " |")
    return lines
