"""Publishing scan events: one JSON message per scan, keyed by EPC, in file order, at a rate."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from tqdm import tqdm

from config import Settings
from detector.schema import InvalidScan, to_scan
from producer.kafka import DeliveryTracker, make_producer, produce_with_backpressure
from producer.readers import BadRow

log = structlog.get_logger(__name__)


@dataclass
class PublishReport:
    published: int = 0
    bad_rows: list[tuple[int, str]] = field(default_factory=list)
    invalid_sent: int = 0  # bad rows published anyway (`send_invalid`)
    failed_deliveries: int = 0
    seconds: float = 0.0


def publish_scans(
    rows: Iterable[tuple[int, dict[str, Any] | BadRow]],
    settings: Settings,
    rate_per_s: float | None = None,
    send_invalid: bool = False,
    show_progress: bool = True,
    total: int | None = None,
) -> PublishReport:
    """Publish records to the scan topic; invalid rows are reported by line, not sent.

    Each record gets an `eventId` if it has none (derived from its content, so a replay of the
    same file produces the same ids). With `send_invalid`, rows that were read but fail
    validation are sent as they are, which is how the dead-letter path is exercised; rows that
    cannot be read at all (a wrong number of columns, a line that is not JSON) have no record to
    send and are only reported.
    """
    producer = make_producer(settings)
    tracker = DeliveryTracker()
    report = PublishReport()
    started = time.monotonic()
    bar = tqdm(total=total, desc="publishing", unit="scan", disable=not show_progress)
    for number, record in rows:
        if isinstance(record, BadRow):
            report.bad_rows.append((number, record.reason))
            continue
        try:
            scan = to_scan(record, settings.site_timezone)
            record = {**record, "eventId": scan.event_id}
            key = scan.epc
        except InvalidScan as exc:
            report.bad_rows.append((number, str(exc)))
            if not send_invalid:
                continue
            key = str(record.get("epc_code") or "")
            report.invalid_sent += 1
        if rate_per_s:
            due = started + report.published / rate_per_s
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        produce_with_backpressure(
            producer,
            settings.topic_scans,
            key=key.encode(),
            value=orjson.dumps(record),
            on_delivery=tracker,
        )
        producer.poll(0)
        report.published += 1
        bar.update(1)
    producer.flush(60)
    bar.close()
    report.failed_deliveries = len(tracker.failed)
    report.seconds = time.monotonic() - started
    log.info(
        "scans_published",
        topic=settings.topic_scans,
        published=report.published,
        bad_rows=len(report.bad_rows),
        failed_deliveries=report.failed_deliveries,
        seconds=round(report.seconds, 2),
    )
    return report
