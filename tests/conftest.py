"""Shared fixtures: a small hand-made network for rule tests, and scans built by name."""

from __future__ import annotations

import itertools

import pytest

from config import Settings
from detector.features import Featurizer
from detector.reference import Reference
from detector.schema import EVENT_TYPES, STEP_INDEX, Scan, derive_event_id, parse_event_time
from producer.simulate import locations_frame, simulate

COMPANY = "8805843"
GOOD_EPC = f"001.{COMPANY}.3842332.100006.20250701.000008002"
# The standard journey: (event type, business step, site).
JOURNEY = [
    ("Aggregation", "Factory", "F1"),
    ("WMS_Inbound", "WMS", "W1"),
    ("WMS_Outbound", "WMS", "W1"),
    ("HUB_Inbound", "Logistics_HUB", "H1"),
    ("HUB_Outbound", "Logistics_HUB", "H1"),
    ("W_Stock_Inbound", "W_Stock_Inbound", "D1"),
    ("W_Stock_Outbound", "W_Stock_Outbound", "D1"),
    ("R_Stock_Inbound", "R_Stock_Inbound", "R1"),
    ("R_Stock_Outbound", "R_Stock_Outbound", "R1"),
    ("POS_Sell", "POS_Sell", "R1"),
]
HOP_BOUND_S = 1800.0
_ids = itertools.count()


@pytest.fixture
def settings() -> Settings:
    return Settings()


@pytest.fixture
def reference() -> Reference:
    """F1 → W1 → H1 → D1 → R1, plus a second hub H2, wholesaler D2 and retailer R2 (D2 only)."""
    tiers = {"F1": 0, "W1": 1, "H1": 2, "H2": 2, "D1": 3, "D2": 3, "R1": 4, "R2": 4}
    routes = [
        ("F1", "W1"),
        ("W1", "H1"),
        ("W1", "H2"),
        ("H1", "D1"),
        ("H2", "D2"),
        ("D1", "R1"),
        ("D2", "R2"),
        ("H1", "D2"),
    ]
    transitions = {
        (EVENT_TYPES.index(a[0]), EVENT_TYPES.index(b[0]))
        for a, b in zip(JOURNEY, JOURNEY[1:], strict=False)
    }
    return Reference(
        registered_prefixes=frozenset({COMPANY}),
        site_tiers=tiers,
        site_names={s: f"site {s}" for s in tiers},
        coordinates={},
        route_support={r: 50 for r in routes},
        route_bound_s={r: HOP_BOUND_S for r in routes},
        tier_bound_s={},
        transitions=frozenset(transitions),
        min_route_support=3,
        max_speed_kmh=150,
        stats={"origin_shipments": {}},
    )


def make_scan(event_type: str, step: str, site: str, t: str, epc: str = GOOD_EPC) -> Scan:
    return Scan(
        event_id=derive_event_id(epc, t, site, event_type) + f"-{next(_ids)}",
        epc=epc,
        t=parse_event_time(t),
        location=site,
        step=STEP_INDEX[step],
        etype=EVENT_TYPES.index(event_type),
        event_time=t,
        scan_location=site,
    )


class Runner:
    """Feeds scans one at a time through one featurizer and keeps each scan's rule evidence."""

    def __init__(self, reference: Reference, settings: Settings) -> None:
        self.featurizer = Featurizer(reference, settings)
        self.table = self.featurizer.table()

    def feed(self, scan: Scan) -> dict:
        done = self.featurizer.batch(self.table, [scan])
        return self.featurizer.evidence_of(done, 0, self.table)


@pytest.fixture
def runner(reference: Reference, settings: Settings) -> Runner:
    return Runner(reference, settings)


@pytest.fixture(autouse=True)
def _end_started_detectors():
    """Kill the detectors a test started and did not end (it failed first), by their PIDs."""
    yield
    from tests.kafka_support import STARTED

    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait(30)


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory):
    """A model trained on simulated history of the network every test stream uses."""
    from detector.train import train_model

    settings = Settings(train_epochs_max=20)
    history = simulate(12000, 3, settings)
    records = (
        {k: v for k, v in r.items() if not k.startswith("_")}
        for r in history.rows_in_arrival_order()
    )
    root = tmp_path_factory.mktemp("models")
    return train_model(
        records, settings, root, locations_frame(history.network), show_progress=False
    )
