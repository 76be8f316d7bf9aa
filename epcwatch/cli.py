"""The `epcwatch` command line. Each subcommand's help carries an example."""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from pydantic_settings.exceptions import SettingsError

from config import Settings

app = typer.Typer(
    help="epcwatch: catch counterfeit, cloned, misplaced, out-of-order and impossible scans "
    "in a supply chain's scan stream on Apache Kafka.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _settings(**overrides: object) -> Settings:
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except (ValidationError, FileNotFoundError) as exc:
        typer.secho(f"invalid configuration:\n{exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    except SettingsError as exc:  # an env var pydantic-settings could not even parse
        typer.secho(
            f"invalid configuration: {exc}\n(list settings are JSON in an environment "
            'variable, e.g. EPCWATCH_REGISTERED_PREFIXES=\'["8805843", "8808271"]\')',
            fg="red",
            err=True,
        )
        raise typer.Exit(2) from exc
    for name, hint in unknown_env_settings(os.environ):
        typer.secho(
            f"warning: {name} is not a setting and is ignored" + (f" ({hint}?)" if hint else ""),
            fg="yellow",
            err=True,
        )
    from epcwatch.logs import configure_logging

    configure_logging(settings)
    return settings


# EPCWATCH_ variables that are not settings: read by the broker scripts, the tests, config.
OTHER_ENV = {"CONFIG_FILE", "KAFKA_PORT", "KAFKA_CONTROLLER_PORT", "KAFKA_HOME"}


def unknown_env_settings(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """`EPCWATCH_*` variables that name no setting (a typo is otherwise silently ignored),
    each with the closest setting's variable, if one is close.

    >>> unknown_env_settings({"EPCWATCH_TOPIC_PARTITON": "3", "EPCWATCH_LOG_LEVEL": "INFO"})
    [('EPCWATCH_TOPIC_PARTITON', 'EPCWATCH_TOPIC_PARTITIONS')]
    """
    known = {name.upper() for name in Settings.model_fields} | OTHER_ENV
    found = []
    for variable in sorted(environ):
        name = variable.removeprefix("EPCWATCH_")
        if name == variable or name in known or name.startswith("TEST_"):
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1)
        found.append((variable, f"EPCWATCH_{close[0]}" if close else None))
    return found


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(message, fg="red", err=True)
    return typer.Exit(code)


@app.command()
def simulate(
    output: Annotated[Path, typer.Option("-o", "--output", help="scan file to write")] = Path(
        "data/scans.tsv"
    ),
    items: Annotated[int, typer.Option(help="number of EPCs (items)")] = 20000,
    seed: Annotated[int, typer.Option(help="seed of the journeys")] = 1,
    network_seed: Annotated[int, typer.Option(help="seed of the network's shape")] = 1,
    anomaly_share: Annotated[float, typer.Option(help="share of items given an anomaly")] = 0.0,
    days: Annotated[float, typer.Option(help="length of the observed period")] = 14.0,
    start: Annotated[str, typer.Option(help="first day, YYYY-MM-DD")] = "2025-07-01",
    csv: Annotated[bool, typer.Option("--csv", help="comma-separated instead of tabs")] = False,
    event_ids: Annotated[bool, typer.Option(help="write an eventId column in front")] = True,
) -> None:
    """Simulate a supply-chain network and its scans (raw export layout), with labels.

    Writes the scan file, locations.csv (sites with coordinates) beside it and, with
    --anomaly-share, <name>.labels.csv with the injected incidents.

    Example: epcwatch simulate -o data/stream.tsv --items 5000 --anomaly-share 0.05 --seed 2
    """
    from producer.simulate import simulate as run_simulation
    from producer.simulate import write_simulation

    settings = _settings()
    begin = datetime.strptime(start, "%Y-%m-%d").replace(tzinfo=UTC)
    sim = run_simulation(
        items, seed, settings, anomaly_share, days, begin, network_seed=network_seed
    )
    paths = write_simulation(sim, output, event_ids=event_ids, separator="," if csv else "\t")
    scans = sum(len(j) for j in sim.journeys.values())
    typer.echo(f"wrote {scans} scans of {len(sim.journeys)} items to {paths['scans']}")
    typer.echo(f"sites: {paths['locations']}")
    if sim.incidents:
        typer.echo(f"{len(sim.incidents)} injected incidents: {paths['labels']}")


@app.command()
def produce(
    file: Annotated[Path, typer.Argument(help="scan file: TSV/CSV raw export or JSON lines")],
    rate: Annotated[float, typer.Option(help="scans per second (0: as fast as possible)")] = 0.0,
    send_invalid: Annotated[
        bool,
        typer.Option(
            help="also send rows that were read but fail validation (to exercise the DLQ); "
            "unreadable rows (wrong column count, not JSON) are only reported"
        ),
    ] = False,
) -> None:
    """Publish a scan file onto the scan topic, one JSON message per scan keyed by EPC.

    Rows are sent in file order; rows that cannot be read are listed with their line numbers.

    Example: epcwatch produce data/stream.tsv --rate 5000
    """
    from producer.kafka import BrokerUnavailable, ensure_topics
    from producer.publish import publish_scans
    from producer.readers import read_scans

    settings = _settings()
    if not file.exists():
        raise _fail(f"no such file: {file}")
    try:
        ensure_topics(settings)
    except BrokerUnavailable as exc:
        raise _fail(str(exc)) from exc
    total = sum(1 for _ in file.open("rb")) - 1
    report = publish_scans(
        read_scans(file), settings, rate or None, send_invalid, sys.stderr.isatty(), total
    )
    for number, reason in report.bad_rows[:20]:
        typer.secho(f"{file}:{number}: {reason}", fg="yellow", err=True)
    if len(report.bad_rows) > 20:
        typer.secho(f"... and {len(report.bad_rows) - 20} more bad rows", fg="yellow", err=True)
    typer.echo(
        f"published {report.published} scans to {settings.topic_scans} in "
        f"{report.seconds:.1f} s; {len(report.bad_rows)} bad rows"
        + (f" ({report.invalid_sent} sent anyway)" if send_invalid and report.bad_rows else "")
    )
    if report.failed_deliveries:
        raise _fail(f"{report.failed_deliveries} scans were not acknowledged by the broker")


@app.command()
def train(
    history: Annotated[
        Path | None, typer.Argument(help="history scan file (omit with --simulate)")
    ] = None,
    locations: Annotated[
        Path | None, typer.Option(help="locations.csv with location_id, latitude, longitude")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="models root (default: models/)")
    ] = None,
    simulate_items: Annotated[
        int, typer.Option("--simulate", help="train on this many simulated items instead")
    ] = 0,
    promote_model: Annotated[
        bool, typer.Option("--promote/--no-promote", help="make it <root>/current")
    ] = True,
) -> None:
    """Train a model from history: learn the network, inject anomalies, fit the LSTM.

    Writes a versioned model directory under the models root and (by default) points
    <root>/current at it.

    Example: epcwatch train data/history.tsv --locations data/locations.csv
    """
    import pandas as pd

    from detector.artifact import promote
    from detector.train import train_model
    from producer.readers import read_scans

    settings = _settings()
    root = output or settings.models_root
    if history is None and not simulate_items:
        raise _fail("give a history file, or --simulate N to train on simulated history")
    if history is not None:
        if not history.exists():
            raise _fail(f"no such file: {history}")
        records = (r for _, r in read_scans(history) if isinstance(r, dict))
        sites = pd.read_csv(locations, dtype={"location_id": str}) if locations else None
    else:
        from producer.simulate import locations_frame
        from producer.simulate import simulate as run_simulation

        sim = run_simulation(simulate_items, settings.seed, settings)
        records = (
            {k: v for k, v in r.items() if not k.startswith("_")}
            for r in sim.rows_in_arrival_order()
        )
        sites = locations_frame(sim.network) if locations is None else pd.read_csv(locations)
    path = train_model(records, settings, root, sites, show_progress=sys.stderr.isatty())
    typer.echo(f"model written to {path}")
    if promote_model:
        typer.echo(f"{promote(root, path.name)} -> {path.name}")


@app.command()
def evaluate(
    output: Annotated[Path, typer.Option("-o", "--out", help="report directory")] = Path(
        "docs/evaluation"
    ),
    history_items: Annotated[int, typer.Option(help="history items per network")] = 16000,
    stream_items: Annotated[int, typer.Option(help="labelled stream items per network")] = 10000,
    seeds: Annotated[str, typer.Option(help="network seeds, comma-separated")] = "1,2,3",
) -> None:
    """Measure detection on simulated networks the model never saw scored.

    Per network seed (each with its own shape): train on simulated history, score a later
    labelled stream; report per type precision, recall, F1, false alarms per 10k clean
    events, confusion, rules-only vs LSTM-only vs combined, and calibration (markdown, JSON,
    PNG).

    Example: epcwatch evaluate --out docs/evaluation --history-items 16000 --seeds 1,2,3
    """
    from detector.evaluate import run_evaluation
    from producer import simulate as simulator

    settings = _settings()
    try:
        network_seeds = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError as exc:
        raise _fail(f"--seeds takes comma-separated integers, got {seeds!r}") from exc
    command = (
        f"epcwatch evaluate --out {output} --history-items {history_items} "
        f"--stream-items {stream_items} --seeds {','.join(map(str, network_seeds))}"
    )
    results = run_evaluation(
        simulator, settings, output, network_seeds, history_items, stream_items, command
    )
    for network in results["networks"]:
        for name, target in network["targets"].items():
            verdict = "met" if target["met"] else "MISSED"
            typer.echo(
                f"network {network['network_seed']}: {name} {target['measured']:.4f} "
                f"(target {target['target']}) {verdict}"
            )
    typer.echo(f"report: {output}")


@app.command()
def detect(
    model: Annotated[Path | None, typer.Option(help="model directory")] = None,
    idle_exit_s: Annotated[
        float | None, typer.Option(help="exit after this many seconds with partitions but no input")
    ] = None,
) -> None:
    """Run the detector: consume scan events, publish alerts, commit after acknowledgement.

    Runs until SIGTERM/SIGINT; start more processes with the same group to share the work.

    Example: epcwatch detect --model models/current
    """
    import signal
    import threading

    # Installed before the slow imports, so a SIGTERM during start-up also ends cleanly.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    from consumer.service import DetectorFenced, DetectorService
    from detector.artifact import ModelUnavailable
    from producer.kafka import BrokerUnavailable, ensure_topics

    settings = _settings(model_dir=model, idle_exit_s=idle_exit_s)
    try:
        ensure_topics(settings, timeout_s=settings.commit_retry_s)  # the broker may be starting
        service = DetectorService(settings, stop)
    except (ModelUnavailable, BrokerUnavailable) as exc:
        raise _fail(str(exc)) from exc
    try:
        service.run()
    except DetectorFenced as exc:
        raise _fail(str(exc)) from exc


@app.command()
def score(
    file: Annotated[Path, typer.Argument(help="scan file: TSV/CSV raw export or JSON lines")],
    model: Annotated[Path | None, typer.Option(help="model directory")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="report CSV")] = Path(
        "anomaly_report.csv"
    ),
) -> None:
    """Score a scan file offline with the same detector and write anomaly_report.csv.

    The report keeps the input columns and adds <type>_detected and <type>_confidence per
    anomaly type; the summary gives the share of items flagged and the alert level.

    Example: epcwatch score data/stream.tsv -o anomaly_report.csv
    """
    import torch

    from detector.artifact import ModelUnavailable, load_model
    from detector.report import score_file, write_report
    from detector.schema import ANOMALY_TYPES, ANOMALY_WORDS

    settings = _settings(model_dir=model)
    torch.set_num_threads(settings.torch_threads)
    if not file.exists():
        raise _fail(f"no such file: {file}")
    try:
        loaded = load_model(settings.model_dir)
    except ModelUnavailable as exc:
        raise _fail(str(exc)) from exc
    frame, summary = score_file(file, loaded, settings, sys.stderr.isatty())
    write_report(frame, output)
    for number, reason in summary.invalid_rows[:20]:
        typer.secho(f"{file}:{number}: skipped: {reason}", fg="yellow", err=True)
    typer.echo(f"items analysed: {summary.items} ({summary.events} scans)")
    typer.echo(
        f"items flagged:  {summary.flagged_items} ({summary.flagged_share:.2%})"
        f"  alert level: {summary.level}"
    )
    for anomaly_type in ANOMALY_TYPES:
        n = summary.per_type_items[anomaly_type]
        share = n / summary.items if summary.items else 0.0
        typer.echo(
            f"  {anomaly_type:<12} {n:>7} items ({share:.2%})  "
            f"{summary.per_type_events[anomaly_type]:>7} scans  - {ANOMALY_WORDS[anomaly_type]}"
        )
    if summary.invalid_rows:
        typer.echo(f"rows skipped as unreadable: {len(summary.invalid_rows)}")
    typer.echo(f"report: {output}  (model {loaded.version})")


@app.command()
def retrain(
    once: Annotated[
        bool, typer.Option("--once", help="handle one retrain request, then exit")
    ] = False,
) -> None:
    """Run the retrainer: turn retrain requests on the drift topic into model decisions.

    For each request it reads recent scan history by timestamp, trains a candidate, scores
    candidate and current model on held-out EPCs with injected anomalies, promotes the
    candidate only if it is not worse by more than retrain_margin, and announces the decision
    on the model-updates topic. Runs until SIGTERM/SIGINT.

    Example: epcwatch retrain --once
    """
    from drift.retrain import RetrainWorker, UpdateNotAcknowledged
    from producer.kafka import BrokerUnavailable, ensure_topics

    settings = _settings()
    try:
        ensure_topics(settings)
        updates = RetrainWorker(settings).run(once=once)
    except (BrokerUnavailable, UpdateNotAcknowledged) as exc:
        raise _fail(str(exc)) from exc
    for update in updates:
        typer.echo(
            f"{update.decision}: {update.candidate_version or 'no candidate'} "
            f"(current {update.current_version or 'none'}): {update.reason}"
        )


@app.command()
def models(
    root: Annotated[Path | None, typer.Option(help="models root (default: models/)")] = None,
) -> None:
    """List model versions, oldest first, with their evaluation numbers; * marks current.

    Shows validation macro-F1 and per-type F1 from training, and for retrained candidates
    the retrain decision with candidate and compared model's macro-F1 on recent data.

    Example: epcwatch models
    """
    from detector.schema import ANOMALY_TYPES
    from drift.retrain import model_versions

    settings = _settings()
    root = root or settings.models_root
    if not root.is_dir():
        raise _fail(f"no models root at {root} — train one with `epcwatch train`")
    rows = list(model_versions(root))
    if not rows:
        raise _fail(f"no models under {root} — train one with `epcwatch train`")
    short = {"epcFake": "fake", "epcDup": "dup", "locErr": "loc", "evtOrderErr": "ord"}
    typer.echo(
        f"  {'version':<26} {'created (UTC)':<17} {'val F1':>6}  "
        + " ".join(f"{short.get(t, t):>5}" for t in ANOMALY_TYPES)
        + "  retrain"
    )
    for row in rows:
        f1 = row["validation_f1"]
        macro = row["validation_macro_f1"]
        retrained = row["retrain"]
        verdict = ""
        if retrained:
            current = retrained.get("current") or {}
            verdict = (
                f"{retrained['decision']} ({retrained['candidate']['macro_f1']:.3f} vs "
                f"{current.get('macro_f1', float('nan')):.3f})"
            )
        typer.echo(
            f"{'*' if row['current'] else ' '} {row['version']:<26} "
            f"{row['created']:%Y-%m-%d %H:%M}  "
            f"{'-' if macro is None else format(macro, '.3f'):>6}  "
            + " ".join(f"{f1[t]:>5.2f}" if t in f1 else f"{'-':>5}" for t in ANOMALY_TYPES)
            + f"  {verdict}"
        )


@app.command()
def rollback(
    version: Annotated[str, typer.Argument(help="model version to make current")],
    root: Annotated[Path | None, typer.Option(help="models root (default: models/)")] = None,
) -> None:
    """Point models/current at an earlier (or any kept) model version.

    The version must be listed by `epcwatch models` and must load; running detectors switch to
    it between batches.

    Example: epcwatch rollback 20250701T120000-1a2b3c4d
    """
    from detector.artifact import ModelUnavailable, load_model, promote
    from drift.retrain import model_versions

    settings = _settings()
    root = root or settings.models_root
    known = [row["version"] for row in model_versions(root)] if root.is_dir() else []
    if version not in known:
        listed = ", ".join(known[-5:]) or "none"
        raise _fail(
            f"no model version {version!r} under {root}; known versions (latest): {listed}. "
            "See `epcwatch models`."
        )
    try:
        load_model(root / version)
    except ModelUnavailable as exc:
        raise _fail(f"refusing to roll back to {version}: {exc}") from exc
    promote(root, version)
    typer.echo(f"{root / 'current'} -> {version}")


@app.command()
def topics() -> None:
    """Create the topics epcwatch uses (if missing) and show their partition counts.

    Example: epcwatch topics
    """
    from producer.kafka import BrokerUnavailable, ensure_topics

    settings = _settings()
    try:
        counts = ensure_topics(settings)
    except BrokerUnavailable as exc:
        raise _fail(str(exc)) from exc
    for topic, partitions in counts.items():
        typer.echo(f"{topic:<24} {partitions} partition{'s' if partitions != 1 else ''}")


@app.command()
def tail(
    from_beginning: Annotated[bool, typer.Option(help="start at the oldest alert")] = False,
    limit: Annotated[int, typer.Option(help="stop after this many alerts (0: never)")] = 0,
) -> None:
    """Print alerts from the alerts topic as they arrive, one readable line each.

    Example: epcwatch tail --from-beginning --limit 20
    """
    import uuid

    import orjson
    from confluent_kafka import Consumer

    settings = _settings()
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"epcwatch-tail-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest" if from_beginning else "latest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([settings.topic_alerts])
    shown = 0
    try:
        while not limit or shown < limit:
            message = consumer.poll(1.0)
            if message is None or message.error():
                continue
            alert = orjson.loads(message.value())
            typer.echo(
                f"{alert['severity']:<6} {alert['anomaly_type']:<11} "
                f"{alert['confidence']:.2f} {alert['epc_code']} @ {alert['location']} "
                f"{alert['event_time']}: {alert['explanation']['text']}"
            )
            shown += 1
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()


@app.command()
def bench(
    scans: Annotated[int, typer.Option(help="scans in the simulated stream")] = 1_000_000,
    rate: Annotated[float, typer.Option(help="input rate of the latency run, scans/s")] = 5000.0,
    latency_s: Annotated[float, typer.Option(help="length of the latency run (0: skip)")] = 30.0,
    train_scans: Annotated[
        int, typer.Option(help="history scans for the training time (0: skip)")
    ] = 1_000_000,
    results: Annotated[Path, typer.Option(help="where the JSON goes")] = Path("bench/results"),
) -> None:
    """Measure throughput, latency and memory on the local broker, on topics of its own.

    Publishes a simulated stream once, then measures the bare consume rate (the ceiling), the
    detector end to end, alert latency at a fixed rate, memory per EPC, scoring and training.
    Prints a table and writes JSON named by date.

    Example: epcwatch bench --scans 100000 --latency-s 10 --train-scans 0
    """
    from epcwatch.bench import BenchError, BenchOptions, format_report, run_bench, write_results
    from producer.kafka import BrokerUnavailable

    settings = _settings()
    options = BenchOptions(scans, rate, latency_s, train_scans, results_dir=results)
    try:
        measured = run_bench(settings, options)
    except (BrokerUnavailable, BenchError) as exc:
        raise _fail(str(exc)) from exc
    typer.echo(format_report(measured))
    typer.echo(f"results: {write_results(measured, results)}")


@app.command()
def demo(
    items: Annotated[int, typer.Option(help="items in the demo stream")] = 6000,
    anomaly_share: Annotated[float, typer.Option(help="share of items with an anomaly")] = 0.05,
    workdir: Annotated[Path, typer.Option(help="where the demo writes its files")] = Path(
        "out/demo"
    ),
) -> None:
    """The whole pipeline once: topics, a model if none, detector, a replay, what was caught.

    Example: epcwatch demo --items 6000
    """
    from epcwatch.demo import run_demo

    settings = _settings()
    code = run_demo(settings, items, anomaly_share, workdir)
    raise typer.Exit(code)
