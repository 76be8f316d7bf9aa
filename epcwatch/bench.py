"""The benchmark behind `epcwatch bench`: how fast the pipeline is on this machine, and why.

One run publishes a simulated stream once to topics of its own on the local broker, then
measures, each against the same data: the bare consume rate (the ceiling), the detector's
sustained end-to-end rate, event-to-alert latency at a fixed input rate, memory per tracked
EPC, offline scoring and training. Results are returned as a dict and written as JSON; the
numbers are measurements, never assertions.
"""

from __future__ import annotations

import gc
import math
import multiprocessing
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition
from confluent_kafka.admin import AdminClient

from config import Settings

log = structlog.get_logger(__name__)

# Scans per simulated item on average; used to size the simulation from a scan count.
SCANS_PER_ITEM = 4.7
# Items whose whole journeys are replayed under tracemalloc to measure bytes per EPC.
MEMORY_SAMPLE_EPCS = 5_000
# After the last scan is produced, wait this long without a new alert before stopping.
LATENCY_DRAIN_S = 5.0
DETECTOR_START_TIMEOUT_S = 90.0
CONSUME_TIMEOUT_S = 600.0
REPO = Path(__file__).resolve().parents[1]


class BenchError(RuntimeError):
    """A benchmark phase could not run; the message says which and why."""


@dataclass
class BenchOptions:
    scans: int = 1_000_000
    rate_per_s: float = 5000.0
    latency_s: float = 30.0
    train_scans: int = 1_000_000
    anomaly_share: float = 0.05
    seed: int = 11
    results_dir: Path = Path("bench/results")


# ---------------------------------------------------------------------------- pure helpers


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0–100) with linear interpolation between ranks, like numpy's default.

    >>> percentile([1, 2, 3, 4], 50)
    2.5
    >>> percentile([5.0], 99)
    5.0
    """
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def format_table(rows: Iterable[Sequence[str]], header: Sequence[str]) -> str:
    """Left-aligned text columns, numbers right-aligned, two spaces apart.

    >>> print(format_table([("raw", "12,000")], ("measure", "scans/s")))
    measure  scans/s
    raw       12,000
    """
    table = [list(header), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]

    def cell(text: str, width: int) -> str:
        numeric = text[:1].isdigit() or text[:1] in "-≤≥~"
        return text.rjust(width) if numeric else text.ljust(width)

    return "\n".join(
        "  ".join(cell(t, w) for t, w in zip(r, widths, strict=True)).rstrip() for r in table
    )


def rate_text(value: float | None) -> str:
    """A rate as people read it.

    >>> rate_text(51234.6), rate_text(None)
    ('51,235', 'n/a')
    """
    return "n/a" if value is None or math.isnan(value) else f"{value:,.0f}"


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float | int]:
    """Count, p50, p99 and max of latencies in milliseconds.

    >>> latency_summary([10.0, 20.0, 30.0])["p50_ms"]
    20.0
    """
    return {
        "count": len(latencies_ms),
        "p50_ms": round(percentile(latencies_ms, 50), 1),
        "p99_ms": round(percentile(latencies_ms, 99), 1),
        "max_ms": round(max(latencies_ms), 1) if latencies_ms else math.nan,
    }


def result_file(results_dir: Path, started: datetime) -> Path:
    """Where a run's JSON goes: named by its start time (UTC).

    >>> result_file(Path("bench/results"), datetime(2026, 12, 3, 17, 5, tzinfo=UTC)).name
    '2026-12-03T170500Z.json'
    """
    return results_dir / f"{started:%Y-%m-%dT%H%M%SZ}.json"


# ---------------------------------------------------------------------------- machine


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _status_bytes(field: str, pid: int | str = "self") -> int:
    for line in _read_text(f"/proc/{pid}/status").splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def rss_bytes() -> int:
    """Resident set size of this process now (Linux), 0 where unknown."""
    return _status_bytes("VmRSS")


def peak_rss_bytes(pid: int | str = "self") -> int:
    """Peak RSS of a process (Linux `VmHWM`). Not `ru_maxrss`: Linux carries that across
    fork and exec, so a child started by a large parent would report the parent's peak."""
    return _status_bytes("VmHWM", pid)


def machine_info() -> dict[str, Any]:
    """Cores, memory, CPU model, load and library versions of the machine running the bench."""
    import confluent_kafka
    import numpy
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in _read_text("/proc/cpuinfo").splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    mem_kb = next(
        (
            int(line.split()[1])
            for line in _read_text("/proc/meminfo").splitlines()
            if line.startswith("MemTotal:")
        ),
        0,
    )
    return {
        "cores": os.cpu_count(),
        "ram_gb": round(mem_kb / 1024**2, 1),
        "cpu_model": cpu,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": numpy.__version__,
        "confluent_kafka": confluent_kafka.__version__,
        "librdkafka": confluent_kafka.libversion()[0],
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# ---------------------------------------------------------------------------- topics


def bench_settings(settings: Settings, tag: str) -> Settings:
    """Settings whose topics and group are the bench's own, named `bench-<tag>-...`."""
    topics = {
        name: f"bench-{tag}-{name.removeprefix('topic_')}"
        for name, value in settings.model_dump().items()
        if name.startswith("topic_") and isinstance(value, str)
    }
    return settings.model_copy(update={**topics, "group_id": f"bench-{tag}-detector"})


def topic_names(settings: Settings) -> list[str]:
    return [
        value
        for name, value in settings.model_dump().items()
        if name.startswith("topic_") and isinstance(value, str)
    ]


def delete_topics(settings: Settings, keep: Iterable[str] = ()) -> None:
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    topics = [t for t in topic_names(settings) if t not in set(keep)]
    for topic, future in admin.delete_topics(topics).items():
        try:
            future.result()
        except Exception as exc:  # noqa: BLE001 - a topic that was never created is fine
            log.debug("bench_topic_not_deleted", topic=topic, error=str(exc))


# ---------------------------------------------------------------------------- stream


@dataclass
class Stream:
    """The simulated stream, serialised once: message keys and values in arrival order."""

    keys: list[bytes]
    values: list[bytes]
    event_ids: list[str]
    epcs: int
    memory_sample: list[dict[str, Any]]  # every scan of the first MEMORY_SAMPLE_EPCS items
    file: Path


def build_stream(settings: Settings, options: BenchOptions, workdir: Path) -> Stream:
    """Simulate about `options.scans` scans, write them as a raw export, serialise messages."""
    from producer.simulate import simulate, write_simulation

    items = max(100, math.ceil(options.scans / SCANS_PER_ITEM))
    sim = simulate(items, options.seed, settings, options.anomaly_share)
    file = write_simulation(sim, workdir / "stream.tsv")["scans"]
    sample_epcs = set(list(sim.journeys)[:MEMORY_SAMPLE_EPCS])
    keys: list[bytes] = []
    values: list[bytes] = []
    event_ids: list[str] = []
    sample: list[dict[str, Any]] = []
    for row in sim.rows_in_arrival_order():
        record = {k: v for k, v in row.items() if not k.startswith("_")}
        keys.append(record["epc_code"].encode())
        values.append(orjson.dumps(record))
        event_ids.append(record["eventId"])
        if record["epc_code"] in sample_epcs:
            sample.append(record)
    return Stream(keys, values, event_ids, len(sim.journeys), sample, file)


def publish(settings: Settings, stream: Stream) -> dict[str, Any]:
    """Publish the whole stream as fast as the producer goes; returns count, seconds, rate."""
    from producer.kafka import DeliveryTracker, make_producer, produce_with_backpressure

    producer = make_producer(settings)
    tracker = DeliveryTracker()
    started = time.perf_counter()
    for i, (key, value) in enumerate(zip(stream.keys, stream.values, strict=True)):
        produce_with_backpressure(
            producer, settings.topic_scans, key=key, value=value, on_delivery=tracker
        )
        if i % 1000 == 0:
            producer.poll(0)
    producer.flush(120)
    seconds = time.perf_counter() - started
    if tracker.failed:
        raise BenchError(f"{len(tracker.failed)} scans were not acknowledged: {tracker.failed[0]}")
    return {
        "scans": len(stream.values),
        "seconds": round(seconds, 2),
        "rate_per_s": len(stream.values) / seconds,
    }


# ---------------------------------------------------------------------------- phases


def raw_consume(settings: Settings, expected: int, decode: bool = False) -> dict[str, Any]:
    """Read the scan topic with a bare consumer doing nothing else (or only decoding).

    The clock starts at the first message, so group join time is not counted; the detector's
    rate is timed the same way.
    """
    from consumer.decode import decode_scan

    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"{settings.group_id}-raw-{uuid.uuid4().hex[:6]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([settings.topic_scans])
    count = 0
    first = last = 0.0
    deadline = time.monotonic() + CONSUME_TIMEOUT_S
    try:
        while count < expected and time.monotonic() < deadline:
            messages = consumer.consume(settings.batch_max_messages, 1.0)
            if not messages:
                continue
            if not count:
                first = time.perf_counter()
            for message in messages:
                if message.error() is None:
                    count += 1
                    if decode:
                        decode_scan(
                            message.value(), settings.max_message_bytes, settings.site_timezone
                        )
            last = time.perf_counter()
    finally:
        consumer.close()
    seconds = last - first
    return {
        "scans": count,
        "seconds": round(seconds, 2),
        "rate_per_s": count / seconds if seconds > 0 else math.nan,
    }


def _detector_child(overrides: dict[str, Any], target: int, out: multiprocessing.Queue) -> None:
    """Runs in a fresh process: the real DetectorService on the bench topic until `target`.

    With `target` 0 it runs until it has been idle for `idle_exit_s` (a member of a group
    does not know its share of the stream in advance).
    """
    from consumer.service import DetectorService
    from epcwatch.logs import configure_logging

    settings = Settings(**overrides)
    configure_logging(settings)

    class TimedService(DetectorService):
        """Times the batches; stops once the whole stream has been consumed."""

        first = last = 0.0
        tracked = rss_end = 0
        half_tracked = rss_half = 0  # at half the stream: fixed buffers are full by then

        def process(self, messages: list[Message]) -> None:
            if not self.first:
                self.first = time.perf_counter()
            super().process(messages)
            if target and self.counters.consumed >= target:
                self.checkpoint()  # the last batches' commit is part of the work measured
            self.last = time.perf_counter()
            if target and not self.half_tracked and self.counters.consumed >= target // 2:
                self.half_tracked, self.rss_half = len(self.windows), rss_bytes()
            if target and self.counters.consumed >= target:
                # Windows may be dropped when the group is left, so they are counted here.
                self.tracked, self.rss_end = len(self.windows), rss_bytes()
                self.request_stop()

    try:
        service = TimedService(settings)
    except NotImplementedError as exc:
        out.put({"available": False, "reason": str(exc)})
        return
    rss_before = rss_bytes()
    counters = service.run()
    seconds = service.last - service.first
    if not target:
        service.tracked, service.rss_end = len(service.windows), rss_bytes()
    tracked = service.tracked
    out.put(
        {
            "available": True,
            "guarantee": settings.processing_guarantee,
            "scans": counters.consumed,
            "scored": counters.scored,
            "alerts": sum(counters.alerts.values()),
            "batches": counters.batches,
            "seconds": round(seconds, 2),
            "rate_per_s": counters.consumed / seconds if seconds > 0 else math.nan,
            "first_batch_at": service.first,
            "last_batch_at": service.last,
            "tracked_epcs": tracked,
            "rss_start_mb": round(rss_before / 2**20, 1),
            "rss_end_mb": round(service.rss_end / 2**20, 1),
            "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1),
            "rss_bytes_per_epc": round((service.rss_end - rss_before) / tracked)
            if tracked
            else None,
            # The marginal cost: RSS added per EPC over the second half of the stream, when
            # the client's fetch and send buffers and the interpreter's arenas are warm.
            "rss_bytes_per_epc_second_half": round(
                (service.rss_end - service.rss_half) / (tracked - service.half_tracked)
            )
            if tracked > service.half_tracked > 0
            else None,
        }
    )


def restore_time(settings: Settings) -> dict[str, Any]:
    """How long a detector that is assigned every partition takes to read the changelog the
    throughput run left (all its windows) back into a window store, before its first batch."""
    from consumer.state import WindowStore, restore_partitions
    from detector.artifact import load_model
    from detector.inferencer import Inferencer

    model = load_model(settings.model_dir)
    store = WindowStore(
        settings.window_scans,
        Inferencer(model, settings).hidden,
        model.reference.registered_prefixes,
        settings.state_max_epcs,
        settings.state_ttl_s,
    )
    started = time.perf_counter()
    records = restore_partitions(
        store, settings.bootstrap_servers, settings.topic_state, range(settings.topic_partitions)
    )
    seconds = time.perf_counter() - started
    return {
        "records": records,  # applied; the changelog is not compacted yet, so an EPC has several
        "windows": len(store),
        "seconds": round(seconds, 2),
        "records_per_s": records / seconds if seconds > 0 else math.nan,
    }


def guarantee_settings(settings: Settings, guarantee: str) -> Settings:
    """The bench settings for one guarantee: the same scan topic, outputs and state of its own
    (a shared changelog would make the second run see every scan as already applied)."""
    outputs = {
        name: f"{value}-{guarantee}"
        for name, value in settings.model_dump().items()
        if name.startswith("topic_") and isinstance(value, str) and name != "topic_scans"
    }
    return settings.model_copy(
        update={
            **outputs,
            "group_id": f"{settings.group_id}-{guarantee}",
            "processing_guarantee": guarantee,
        }
    )


def detector_rate(settings: Settings, expected: int) -> dict[str, Any]:
    """The detector's sustained rate over the whole stream, in a process of its own."""
    from producer.kafka import ensure_topics

    ensure_topics(settings)
    guarantee = settings.processing_guarantee
    overrides = {
        name: getattr(settings, name)
        for name in Settings.model_fields
        if name.startswith("topic_") or name in ("model_dir", "group_id", "processing_guarantee")
    }
    context = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue = context.Queue()
    child = context.Process(target=_detector_child, args=(overrides, expected, out))
    child.start()
    deadline = time.monotonic() + CONSUME_TIMEOUT_S * 2
    try:
        while True:
            try:
                return out.get(timeout=1.0)
            except queue.Empty:
                if not child.is_alive() or time.monotonic() > deadline:
                    raise BenchError(
                        f"the {guarantee} detector ended without a result "
                        f"(exit code {child.exitcode}); see its log above"
                    ) from None
    finally:
        child.join(60)
        if child.is_alive():
            child.terminate()


def detector_group_rate(settings: Settings, expected: int, members: int) -> dict[str, Any]:
    """The rate of a consumer group of `members` detector processes over the whole stream.

    Each member runs until it has been idle for 3 s; the group's time runs from the first batch
    of any member to the last batch of any member (the monotonic clock is shared by processes).
    """
    from producer.kafka import ensure_topics

    ensure_topics(settings)
    overrides = {
        name: getattr(settings, name)
        for name in Settings.model_fields
        if name.startswith("topic_") or name in ("model_dir", "group_id", "processing_guarantee")
    }
    overrides["idle_exit_s"] = 3.0
    context = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue = context.Queue()
    children = [
        context.Process(target=_detector_child, args=(overrides, 0, out)) for _ in range(members)
    ]
    for child in children:
        child.start()
    results: list[dict[str, Any]] = []
    deadline = time.monotonic() + CONSUME_TIMEOUT_S * 2
    try:
        while len(results) < members:
            try:
                results.append(out.get(timeout=1.0))
            except queue.Empty:
                if time.monotonic() > deadline or not any(c.is_alive() for c in children):
                    raise BenchError(
                        f"a detector of the group of {members} ended without a result"
                    ) from None
    finally:
        for child in children:
            child.join(60)
            if child.is_alive():
                child.terminate()
    consumed = sum(r["scans"] for r in results)
    # A member that got no partitions (or no messages) never timed a batch: its 0 is no time.
    worked = [r for r in results if r["first_batch_at"]] or results
    seconds = max(r["last_batch_at"] for r in worked) - min(r["first_batch_at"] for r in worked)
    return {
        "available": True,
        "members": members,
        "scans": consumed,
        "complete": consumed >= expected,
        "seconds": round(seconds, 2),
        "rate_per_s": consumed / seconds if seconds > 0 else math.nan,
        "per_member_scans": [r["scans"] for r in results],
    }


def _detector_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        if name.startswith("topic_") or name in ("group_id", "model_dir", "bootstrap_servers"):
            env[f"EPCWATCH_{name.upper()}"] = str(value)
    env["EPCWATCH_LOG_FORMAT"] = "json"
    return env


class _AlertListener(threading.Thread):
    """Reads the alerts topic from its start and notes when each alert arrived."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.arrivals: list[tuple[float, dict[str, Any]]] = []
        self.stop = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        topic = self.settings.topic_alerts
        consumer = Consumer(
            {
                "bootstrap.servers": self.settings.bootstrap_servers,
                "group.id": f"{self.settings.group_id}-listener",
                "enable.auto.commit": False,
            }
        )
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        self.ready.set()
        try:
            while not self.stop.is_set():
                for message in consumer.consume(500, 0.05):
                    if message.error() is None:
                        self.arrivals.append((time.time(), orjson.loads(message.value())))
        finally:
            consumer.close()


def _trigger_time(alert: dict[str, Any], sent: dict[str, float]) -> float | None:
    """When the scan that raised an alert was produced.

    A clone alert mirrored onto the earlier read carries the earlier event id; the scan that
    raised it is the later of the pair.
    """
    other = (alert.get("explanation") or {}).get("evidence", {}).get("other_event_id")
    times = [t for t in (sent.get(alert.get("event_id", "")), sent.get(other or "")) if t]
    return max(times) if times else None


def latency(settings: Settings, stream: Stream, options: BenchOptions) -> dict[str, Any]:
    """Event-to-alert latency with `epcwatch detect` running while scans arrive at a fixed rate.

    Measured per alert: from the moment the bench producer hands the scan to the client (the
    message timestamp) to the moment a subscriber on the alerts topic receives the alert. It
    includes the producer's linger, the detector's poll wait, scoring and the alert's delivery.
    """
    from producer.kafka import ensure_topics, make_producer, produce_with_backpressure

    ensure_topics(settings)
    total = min(len(stream.values), int(options.rate_per_s * options.latency_s))
    detector = subprocess.Popen(
        [sys.executable, "-m", "epcwatch", "detect"],
        env=_detector_env(settings),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    assigned = threading.Event()

    def read_logs() -> None:
        for line in detector.stderr or ():
            lines.append(line)
            if "partitions_assigned" in line:
                assigned.set()

    threading.Thread(target=read_logs, daemon=True).start()
    listener = _AlertListener(settings)
    try:
        if not assigned.wait(DETECTOR_START_TIMEOUT_S):
            raise BenchError("the detector did not join its group: " + "".join(lines[-5:]))
        listener.start()
        listener.ready.wait(30)
        sent = _produce_at_rate(
            settings, stream, total, options.rate_per_s, make_producer, produce_with_backpressure
        )
        produced_s = sent.pop("__seconds__")
        seen = -1
        while seen != len(listener.arrivals):
            seen = len(listener.arrivals)
            time.sleep(LATENCY_DRAIN_S)
    finally:
        listener.stop.set()
        detector_peak = peak_rss_bytes(detector.pid)
        detector.terminate()
        detector.wait(60)
    listener.join(10)
    to_alert = [
        (arrived - t) * 1000
        for arrived, a in listener.arrivals
        if (t := _trigger_time(a, sent)) is not None
    ]
    to_scored = [
        (datetime.fromisoformat(a["detected_at"]).timestamp() - t) * 1000
        for _, a in listener.arrivals
        if (t := _trigger_time(a, sent)) is not None and a.get("detected_at")
    ]
    return {
        "input_rate_per_s": options.rate_per_s,
        "scans": total,
        "achieved_rate_per_s": total / produced_s if produced_s else math.nan,
        "alerts": len(listener.arrivals),
        "produce_to_alert": latency_summary(to_alert),
        "produce_to_detected_at": latency_summary(to_scored),
        "detector_peak_rss_mb": round(detector_peak / 2**20, 1),
        # Batches the detector logged as slow (over `slow_batch_s`), with their phases: what a
        # stall in the latency run was spent on.
        "detector_slow_batches": [
            {k: v for k, v in orjson.loads(line).items() if k != "level"}
            for line in lines
            if '"slow_batch"' in line
        ][:20],
    }


def _produce_at_rate(
    settings: Settings,
    stream: Stream,
    total: int,
    rate: float,
    make_producer: Callable[..., Any],
    produce: Callable[..., None],
) -> dict[str, float]:
    """Produce the first `total` scans at `rate`; returns event id → produce time (epoch s).

    The first scan is sent and acknowledged before the clock starts: an idempotent producer
    holds what it is given until the broker has handed it a producer id, ~0.5 s here, and the
    scans of that first half second would measure the client's start, not the pipeline. That
    first scan is left out of the measurement.
    """
    producer = make_producer(settings)
    sent: dict[str, float] = {}
    if total:
        produce(producer, settings.topic_scans, key=stream.keys[0], value=stream.values[0])
        producer.flush(30)
    started = time.perf_counter()
    for i in range(1 if total else 0, total):
        if i % 25 == 0:
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            producer.poll(0)
        now = time.time()
        sent[stream.event_ids[i]] = now
        produce(
            producer,
            settings.topic_scans,
            key=stream.keys[i],
            value=stream.values[i],
            timestamp=int(now * 1000),
        )
    producer.flush(60)
    sent["__seconds__"] = time.perf_counter() - started
    return sent


def window_memory(settings: Settings, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Bytes per tracked EPC after scoring whole journeys: the fixed width of a window's slot
    in the store's arrays, plus the Python objects per EPC (its string and map entries),
    measured with tracemalloc apart from the arrays."""
    from consumer.state import WindowStore
    from detector.artifact import load_model
    from detector.inferencer import Inferencer
    from detector.schema import to_scan

    model = load_model(settings.model_dir)
    inferencer = Inferencer(model, settings)
    scans = [to_scan(r, settings.site_timezone) for r in records]
    store = WindowStore(
        settings.window_scans,
        inferencer.hidden,
        model.reference.registered_prefixes,
        settings.state_max_epcs,
        settings.state_ttl_s,
        capacity=len({scan.epc for scan in scans}),  # arrays allocated before measuring
    )
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for start in range(0, len(scans), settings.batch_max_messages):
        inferencer.score_batch(scans[start : start + settings.batch_max_messages], store)
    gc.collect()
    objects = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    objects += sum(sys.getsizeof(epc) for epc in store.slot_of)  # made before tracing began
    slot = store.slot_bytes()
    epcs = len(store)
    return {
        "epcs": epcs,
        "scans": len(scans),
        "slot_bytes": slot,
        "object_bytes_per_epc": round(objects / epcs) if epcs else None,
        "bytes_per_epc": round(slot + objects / epcs) if epcs else None,
        "window_scans": settings.window_scans,
    }


def score_rate(settings: Settings, file: Path, workdir: Path) -> dict[str, Any]:
    """`epcwatch score` on the stream file: read + score, then the report CSV, timed apart.

    As `epcwatch score` does it: one process, the file read and scored column by column.
    """
    import torch

    from detector.artifact import load_model
    from detector.report import score_file, write_report

    torch.set_num_threads(settings.torch_threads)  # as `epcwatch score` runs
    loaded = load_model(settings.model_dir)
    started = time.perf_counter()
    frame, summary = score_file(file, loaded, settings, show_progress=False)
    scored_s = time.perf_counter() - started
    write_report(frame, workdir / "anomaly_report.csv")
    total_s = time.perf_counter() - started
    return {
        "scans": summary.events,
        "seconds": round(scored_s, 2),
        "rate_per_s": summary.events / scored_s,
        "with_report_seconds": round(total_s, 2),
        "with_report_rate_per_s": summary.events / total_s,
    }


def training_time(settings: Settings, options: BenchOptions, workdir: Path) -> dict[str, Any]:
    """Train a model on simulated history of about `train_scans` scans, into a scratch root."""
    from detector.train import train_model
    from producer.simulate import locations_frame, simulate

    items = max(100, math.ceil(options.train_scans / SCANS_PER_ITEM))
    sim = simulate(items, options.seed + 1, settings)
    records = [
        {k: v for k, v in r.items() if not k.startswith("_")} for r in sim.rows_in_arrival_order()
    ]
    started = time.perf_counter()
    path = train_model(
        records, settings, workdir / "models", locations_frame(sim.network), show_progress=False
    )
    seconds = time.perf_counter() - started
    meta = orjson.loads((path / "meta.json").read_bytes())
    return {
        "scans": len(records),
        "seconds": round(seconds, 1),
        "epochs": meta.get("training", {}).get("epochs"),
    }


def ensure_model(settings: Settings) -> tuple[Path, bool]:
    """The model to benchmark: `model_dir` if it loads, else one trained on simulated history."""
    from detector.artifact import ModelUnavailable, load_model, promote
    from detector.train import train_model
    from producer.simulate import locations_frame, simulate

    try:
        load_model(settings.model_dir)
        return settings.model_dir, False
    except ModelUnavailable:
        pass
    sim = simulate(20_000, settings.seed, settings)
    records = (
        {k: v for k, v in r.items() if not k.startswith("_")} for r in sim.rows_in_arrival_order()
    )
    path = train_model(
        records, settings, settings.models_root, locations_frame(sim.network), show_progress=False
    )
    promote(settings.models_root, path.name)
    return path, True


# ---------------------------------------------------------------------------- the run


def run_bench(settings: Settings, options: BenchOptions) -> dict[str, Any]:
    """Every measurement, in one run, against topics of the bench's own; returns the results."""
    started = datetime.now(UTC)
    model_dir, trained = ensure_model(settings)
    settings = bench_settings(
        settings.model_copy(update={"model_dir": model_dir}), uuid.uuid4().hex[:8]
    )
    results: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        "model": {
            "dir": str(model_dir),
            "version": orjson.loads((model_dir / "meta.json").read_bytes()).get("version"),
            "trained_for_bench": trained,
        },
        "settings": {
            "batch_max_messages": settings.batch_max_messages,
            "poll_timeout_s": settings.poll_timeout_s,
            "torch_threads": settings.torch_threads,
            "topic_partitions": settings.topic_partitions,
        },
    }
    latency_settings = bench_settings(settings, uuid.uuid4().hex[:8])
    with tempfile.TemporaryDirectory(prefix="epcwatch-bench-") as scratch:
        workdir = Path(scratch)
        try:
            results.update(_measure(settings, latency_settings, options, workdir))
        finally:
            delete_topics(settings)
            delete_topics(latency_settings)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    return results


def _measure(
    settings: Settings, latency_settings: Settings, options: BenchOptions, workdir: Path
) -> dict[str, Any]:
    from producer.kafka import ensure_topics

    out: dict[str, Any] = {}
    log.info("bench_phase", phase="simulate", scans=options.scans)
    stream = build_stream(settings, options, workdir)
    out["stream"] = {
        "scans": len(stream.values),
        "epcs": stream.epcs,
        "anomaly_share": options.anomaly_share,
    }

    ensure_topics(settings)
    log.info("bench_phase", phase="publish", topic=settings.topic_scans)
    out["publish"] = publish(settings, stream)
    expected = len(stream.values)

    log.info("bench_phase", phase="raw_consume")
    out["raw_consume"] = raw_consume(settings, expected)
    log.info("bench_phase", phase="consume_and_decode")
    out["consume_and_decode"] = raw_consume(settings, expected, decode=True)
    for guarantee in ("at_least_once", "exactly_once"):
        log.info("bench_phase", phase="detector", guarantee=guarantee)
        run_settings = guarantee_settings(settings, guarantee)
        try:
            out[f"detector_{guarantee}"] = detector_rate(run_settings, expected)
            if guarantee == "at_least_once":
                log.info("bench_phase", phase="restore")
                out["restore"] = restore_time(run_settings)
        finally:
            delete_topics(run_settings, keep=[settings.topic_scans])

    members = os.cpu_count() or 1
    if members > 1:
        log.info("bench_phase", phase="detector_group", members=members)
        group_settings = guarantee_settings(settings, "at_least_once")
        group_settings = group_settings.model_copy(
            update={"group_id": f"{group_settings.group_id}-group"}
        )
        try:
            out["detector_group"] = detector_group_rate(group_settings, expected, members)
        finally:
            delete_topics(group_settings, keep=[settings.topic_scans])

    if options.latency_s > 0:
        log.info("bench_phase", phase="latency", rate_per_s=options.rate_per_s)
        out["latency"] = latency(latency_settings, stream, options)
    log.info("bench_phase", phase="window_memory")
    out["window_memory"] = window_memory(settings, stream.memory_sample)
    stream_file = stream.file
    del stream
    gc.collect()

    log.info("bench_phase", phase="score")
    out["score"] = score_rate(settings, stream_file, workdir)
    if options.train_scans > 0:
        log.info("bench_phase", phase="train", scans=options.train_scans)
        out["train"] = training_time(settings, options, workdir)
    out["bench_peak_rss_mb"] = round(peak_rss_bytes() / 2**20, 1)
    return out


def write_results(results: dict[str, Any], results_dir: Path) -> Path:
    """Write the results as JSON named by the run's start; returns the path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = result_file(results_dir, datetime.fromisoformat(results["started"]))
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    return path


# ---------------------------------------------------------------------------- the report


def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(measure, value, target) rows of the results table."""
    raw = results.get("raw_consume", {}).get("rate_per_s")
    rows: list[tuple[str, str, str]] = [
        (
            "stream",
            f"{results['stream']['scans']:,} scans / {results['stream']['epcs']:,} EPCs",
            "≥1,000,000 / ≥200,000",
        ),
        ("publish (producer, scans/s)", rate_text(results["publish"]["rate_per_s"]), ""),
        ("raw consume (ceiling, scans/s)", rate_text(raw), ""),
        (
            "consume + decode (scans/s)",
            rate_text(results.get("consume_and_decode", {}).get("rate_per_s")),
            "",
        ),
    ]
    for guarantee, target in (("at_least_once", "50,000"), ("exactly_once", "25,000")):
        result = results.get(f"detector_{guarantee}", {})
        label = f"detector {guarantee.replace('_', '-')} (scans/s)"
        if not result.get("available"):
            rows.append((label, "not available", f"≥{target}"))
            continue
        ratio = f" ({result['rate_per_s'] / raw:.0%} of raw)" if raw else ""
        rows.append((label, rate_text(result["rate_per_s"]) + ratio, f"≥{target} or ≥50% raw"))
    group = results.get("detector_group", {})
    if group.get("available"):
        ratio = f" ({group['rate_per_s'] / raw:.0%} of raw)" if raw else ""
        rows.append(
            (
                f"detector group of {group['members']} processes, at-least-once (scans/s)",
                rate_text(group["rate_per_s"]) + ratio,
                "",
            )
        )
    if "latency" in results:
        lat = results["latency"]
        to_alert = lat["produce_to_alert"]
        rows.append(
            (
                f"latency at {lat['input_rate_per_s']:,.0f}/s, p50 / p99 (ms)",
                f"{to_alert['p50_ms']:,.0f} / {to_alert['p99_ms']:,.0f} "
                f"({to_alert['count']:,} alerts)",
                "p99 ≤250",
            )
        )
    alo = results.get("detector_at_least_once", {})
    if alo.get("available"):
        rows.append(
            (
                "detector peak RSS (MB)",
                f"{alo['peak_rss_mb']:,.0f} ({alo['tracked_epcs']:,} EPCs)",
                "",
            )
        )
        rows.append(("RSS growth per tracked EPC (bytes)", f"{alo['rss_bytes_per_epc']:,}", ""))
        if alo.get("rss_bytes_per_epc_second_half") is not None:
            rows.append(
                (
                    "RSS growth per EPC, second half of the stream (bytes)",
                    f"{alo['rss_bytes_per_epc_second_half']:,}",
                    "",
                )
            )
    restore = results.get("restore")
    if restore:
        rows.append(
            (
                f"restore {restore['windows']:,} windows, {restore['records']:,} records (s)",
                f"{restore['seconds']:,.1f} ({rate_text(restore['records_per_s'])} records/s)",
                "",
            )
        )
    memory = results.get("window_memory", {})
    if memory.get("bytes_per_epc"):
        rows.append(
            ("window heap per tracked EPC (bytes)", f"{memory['bytes_per_epc']:,}", "≤1,024")
        )
    score = results.get("score", {})
    if score:
        rows.append(
            (
                f"score {score['scans']:,} scans (scans/s)",
                f"{rate_text(score['rate_per_s'])} "
                f"({rate_text(score['with_report_rate_per_s'])} with CSV)",
                "≥200,000",
            )
        )
    train = results.get("train")
    if train:
        note = "" if train["scans"] >= 1_000_000 else " (smaller than 1M: see --train-scans)"
        rows.append(
            (
                f"train on {train['scans']:,} scans (s)",
                f"{train['seconds']:,.0f}{note}",
                "≤300 on 1M",
            )
        )
    return rows


def format_report(results: dict[str, Any]) -> str:
    """The table and the machine line the CLI prints."""
    machine = results["machine"]
    lines = [
        format_table(summary_rows(results), ("measure", "value", "target")),
        "",
        f"machine: {machine['cores']} cores, {machine['ram_gb']} GB, {machine['cpu_model']}; "
        f"python {machine['python']}, torch {machine['torch']}, "
        f"confluent-kafka {machine['confluent_kafka']} (librdkafka {machine['librdkafka']})",
        f"load average at start {machine['load_average_at_start']}, at end "
        f"{machine.get('load_average_at_end')}: other work on this machine shares the cores "
        "and the broker, so rates are as measured, not best case",
    ]
    return "\n".join(lines)
