"""Prometheus metrics and the health endpoint of a detector process.

`/metrics` serves the Prometheus registry; `/health` answers 200 while the process is healthy
and 503 when the model failed to load or input is waiting but no batch has finished for
`health_stall_s` (a stuck consumer).
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)


class DetectorMetrics:
    """Every metric a detector exports, in one registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.consumed = Counter("epcwatch_scans_consumed", "scan messages consumed", registry=r)
        self.scored = Counter("epcwatch_scans_scored", "scans scored", registry=r)
        self.replayed = Counter(
            "epcwatch_scans_skipped_replayed", "replayed scans already in a window", registry=r
        )
        self.alerts = Counter(
            "epcwatch_alerts", "alerts published", ["anomaly_type", "severity"], registry=r
        )
        self.dead_letters = Counter("epcwatch_dead_letters", "messages sent to the DLQ", registry=r)
        self.late = Counter("epcwatch_late_scans", "scans beyond the lateness bound", registry=r)
        self.drift_events = Counter("epcwatch_drift_events", "drift events published", registry=r)
        self.nan_scores = Counter(
            "epcwatch_drift_rejected_scores",
            "NaN/inf scores kept from the drift monitor",
            registry=r,
        )
        self.batch_seconds = Histogram(
            "epcwatch_batch_seconds",
            "wall time of one batch, consume to commit",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.lag = Gauge(
            "epcwatch_consumer_lag", "messages behind the end", ["partition"], registry=r
        )
        self.tracked = Gauge("epcwatch_tracked_epcs", "EPC windows in memory", registry=r)
        self.evicted = Gauge("epcwatch_evicted_epcs", "windows evicted by the cap", registry=r)
        self.expired = Gauge("epcwatch_expired_epcs", "windows expired by event time", registry=r)
        self.restored = Counter("epcwatch_restored_windows", "windows restored", registry=r)
        self.model = Gauge("epcwatch_model_info", "model in use", ["model_version"], registry=r)
        self.model_load_failures = Counter(
            "epcwatch_model_load_failures", "models refused at load", registry=r
        )
        self.model_ok = True
        self.last_batch = time.monotonic()
        self.input_waiting = False
        self.stall_s = 120.0

    def set_model(self, version: str) -> None:
        self.model.clear()
        self.model.labels(model_version=version).set(1)

    def health(self) -> tuple[bool, dict]:
        stalled = self.input_waiting and time.monotonic() - self.last_batch > self.stall_s
        healthy = self.model_ok and not stalled
        return healthy, {"healthy": healthy, "model_loaded": self.model_ok, "stalled": stalled}


def serve(metrics: DetectorMetrics, port: int) -> ThreadingHTTPServer:
    """Serve /metrics and /health on 127.0.0.1-or-all:`port` in a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.startswith("/metrics"):
                body, status, kind = generate_latest(metrics.registry), 200, CONTENT_TYPE_LATEST
            elif self.path.startswith("/health"):
                healthy, detail = metrics.health()
                body, status, kind = (
                    orjson.dumps(detail),
                    200 if healthy else 503,
                    "application/json",
                )
            else:
                body, status, kind = b"not found\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            return

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
