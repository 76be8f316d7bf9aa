"""A supply-chain scan simulator: a network of sites and the journeys of items through it.

Factories make lots of one company's product; pallets of items are aggregated at the factory,
moved to its warehouse, to a logistics hub, split into cases for wholesalers, split again for
retailers and finally sold one by one. Pallets share timestamps, travel takes road time plus
handling, stays last hours to days, most items stop somewhere along the way, and journeys still
under way at the end of the period are cut off. Anomalies of the five types can be injected with
ground-truth labels (see `detector.inject`).
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from config import Settings
from detector.inject import Incident, Injector, assign_event_ids, format_time
from detector.reference import haversine_km, learn_reference
from detector.schema import BUSINESS_STEPS, EVENT_INDEX, RAW_COLUMNS, STEP_INDEX

Row = dict[str, Any]

# Scans per item when it stops at stage 2..10, weighted so the mean is about 4.7 scans.
STOP_AFTER_WEIGHTS = {2: 10, 3: 22, 4: 22, 5: 16, 6: 10, 7: 8, 8: 5, 9: 4, 10: 3}
KIND_TIER = {"Factory": 0, "Factory_WMS": 1, "Logistics_HUB": 2, "Wholesaler": 3, "Retailer": 4}
REGIONS = ("ICN", "SEL", "PUS", "TAE", "KWJ", "TJN", "ULS", "SUW", "CHW", "JNJ")


@dataclass
class NetworkShape:
    """The knobs that make one simulated network differ from another."""

    factories: int = 4
    hubs: int = 6
    wholesalers: int = 12
    retailers: int = 32
    companies: int = 3
    hubs_per_warehouse: int = 2
    suppliers_per_retailer: int = 2
    hop_time_scale: float = 1.0


@dataclass
class Site:
    location_id: str
    name: str
    kind: str
    lat: float
    lon: float
    company: str = ""

    @property
    def tier(self) -> int:
        return KIND_TIER[self.kind]


@dataclass
class Network:
    sites: dict[str, Site]
    warehouse_of: dict[str, str]
    hubs_of: dict[str, list[str]]
    wholesalers_of: dict[str, list[str]]
    retailers_of: dict[str, list[str]]
    products: dict[str, list[tuple[str, str]]]  # company → (product code, product name)
    shape: NetworkShape = field(default_factory=NetworkShape)

    def of_kind(self, kind: str) -> list[Site]:
        return [s for s in self.sites.values() if s.kind == kind]


def build_network(shape: NetworkShape, rng: random.Random) -> Network:
    """Sites with coordinates and who supplies whom, nearest suppliers first."""
    sites: dict[str, Site] = {}

    def add(kind: str, lat: float, lon: float, company: str = "") -> Site:
        site_id = str(100 + len(sites))
        region = rng.choice(REGIONS)
        site = Site(site_id, f"{region}_{kind}_{site_id}", kind, lat, lon, company)
        sites[site_id] = site
        return site

    def spot() -> tuple[float, float]:
        return rng.uniform(34.6, 37.9), rng.uniform(126.3, 129.4)

    companies = sorted({f"{rng.randrange(8800000, 8899999):07d}" for _ in range(shape.companies)})
    products = {
        c: [(f"{rng.randrange(10**7):07d}", f"Product {c[-3:]}-{k}") for k in range(4)]
        for c in companies
    }
    warehouse_of: dict[str, str] = {}
    for i in range(shape.factories):
        lat, lon = spot()
        factory = add("Factory", lat, lon, companies[i % len(companies)])
        wms = add("Factory_WMS", lat + rng.uniform(-0.02, 0.02), lon + rng.uniform(-0.02, 0.02))
        warehouse_of[factory.location_id] = wms.location_id
    hubs = [add("Logistics_HUB", *spot()) for _ in range(shape.hubs)]
    wholesalers = [add("Wholesaler", *spot()) for _ in range(shape.wholesalers)]
    retailers = [add("Retailer", *spot()) for _ in range(shape.retailers)]

    def nearest(site: Site, pool: list[Site], k: int) -> list[str]:
        ranked = sorted(pool, key=lambda o: haversine_km((site.lat, site.lon), (o.lat, o.lon)))
        return [o.location_id for o in ranked[:k]]

    hubs_of = {w: nearest(sites[w], hubs, shape.hubs_per_warehouse) for w in warehouse_of.values()}
    wholesalers_of: dict[str, list[str]] = {h.location_id: [] for h in hubs}
    for d in wholesalers:
        for h in nearest(d, hubs, 2):
            wholesalers_of[h].append(d.location_id)
    for h in hubs:
        if not wholesalers_of[h.location_id]:
            wholesalers_of[h.location_id] = nearest(h, wholesalers, 1)
    retailers_of: dict[str, list[str]] = {d.location_id: [] for d in wholesalers}
    for r in retailers:
        for d in nearest(r, wholesalers, shape.suppliers_per_retailer):
            retailers_of[d].append(r.location_id)
    for d in wholesalers:
        if not retailers_of[d.location_id]:
            retailers_of[d.location_id] = nearest(d, retailers, 1)
    return Network(sites, warehouse_of, hubs_of, wholesalers_of, retailers_of, products, shape)


class JourneySimulator:
    """Generates pallets moving through a network; yields journeys keyed by EPC."""

    def __init__(self, network: Network, rng: random.Random, start: datetime, days: float):
        self.net = network
        self.rng = rng
        self.start = start.timestamp()
        self.end = self.start + days * 86400
        self.serial = 0
        self.stop_values = list(STOP_AFTER_WEIGHTS)
        self.stop_weights = list(STOP_AFTER_WEIGHTS.values())

    def travel_s(self, a: str, b: str) -> float:
        sa, sb = self.net.sites[a], self.net.sites[b]
        km = haversine_km((sa.lat, sa.lon), (sb.lat, sb.lon))
        hours = self.rng.uniform(20, 90) / 60 + km / self.rng.uniform(35, 75)
        return hours * 3600 * self.net.shape.hop_time_scale

    def dwell_s(self) -> float:
        hours = max(0.5, math.exp(self.rng.gauss(math.log(8), 0.8)))
        return hours * 3600 * self.net.shape.hop_time_scale

    def run(self, items: int) -> dict[str, list[Row]]:
        journeys: dict[str, list[Row]] = {}
        factories = self.net.of_kind("Factory")
        while len(journeys) < items:
            self._pallet(self.rng.choice(factories), journeys)
        for rows in journeys.values():
            rows[:] = [r for r in rows if r["_t"] <= self.end]
        return {epc: rows for epc, rows in journeys.items() if rows}

    def _pallet(self, factory: Site, journeys: dict[str, list[Row]]) -> None:
        rng = self.rng
        company = factory.company
        product, product_name = rng.choice(self.net.products[company])
        t0 = float(round(rng.uniform(self.start, self.end - 86400)))
        made = datetime.fromtimestamp(t0, tz=UTC)
        lot = f"{rng.randrange(100000, 999999):06d}"
        epcs = []
        for _ in range(rng.randint(20, 60)):
            self.serial += 1
            serial = f"{self.serial:09d}"
            epc = f"001.{company}.{product}.{lot}.{made:%Y%m%d}.{serial}"
            journeys[epc] = []
            epcs.append((epc, serial, rng.choices(self.stop_values, self.stop_weights)[0]))
        base = {
            "hub_type": "",
            "epc_header": "001",
            "epc_company": company,
            "epc_product": product,
            "epc_lot": lot,
            "epc_manufacture": f"{made:%Y%m%d}",
            "product_name": product_name,
            "manufacture_date": f"{made:%Y-%m-%d} 00:00:00",
            "expiry_date": f"{made.year + 2}-{made:%m-%d} 00:00:00",
        }

        def emit(group: list, etype: str, site_id: str, t: float) -> list:
            site = self.net.sites[site_id]
            step = _step_of(etype)
            stage = EVENT_INDEX[etype] + 1
            moving = []
            for epc, serial, stop_after in group:
                if stop_after < stage:
                    continue
                row = dict(base)
                row.update(
                    scan_location=site.name,
                    location_id=site_id,
                    hub_type=site.kind,
                    business_step=step,
                    event_type=etype,
                    operator_id=f"op{int(site_id) * 7 % 97:02d}",
                    device_id=f"dev{site_id}",
                    epc_code=epc,
                    epc_serial=serial,
                    event_time=format_time(t),
                    _t=float(round(t)),
                    _arrival=float(round(t)),
                )
                journeys[epc].append(row)
                moving.append((epc, serial, stop_after))
            return moving

        fid = factory.location_id
        wms = self.net.warehouse_of[fid]
        t = t0
        group = emit(epcs, "Aggregation", fid, t)
        t += self.travel_s(fid, wms)
        group = emit(group, "WMS_Inbound", wms, t)
        t += self.dwell_s()
        group = emit(group, "WMS_Outbound", wms, t)
        hub = rng.choice(self.net.hubs_of[wms])
        t += self.travel_s(wms, hub)
        group = emit(group, "HUB_Inbound", hub, t)
        t += self.dwell_s()
        group = emit(group, "HUB_Outbound", hub, t)
        for case in _split(group, rng, 5, 15):
            self._wholesale(case, hub, t, emit)

    def _wholesale(self, case: list, hub: str, t: float, emit) -> None:
        rng = self.rng
        dealer = rng.choice(self.net.wholesalers_of[hub])
        t += self.travel_s(hub, dealer)
        case = emit(case, "W_Stock_Inbound", dealer, t)
        t += self.dwell_s()
        case = emit(case, "W_Stock_Outbound", dealer, t)
        for box in _split(case, rng, 1, 5):
            shop = rng.choice(self.net.retailers_of[dealer])
            tb = t + self.travel_s(dealer, shop)
            box = emit(box, "R_Stock_Inbound", shop, tb)
            tb += self.dwell_s()
            box = emit(box, "R_Stock_Outbound", shop, tb)
            for item in box:
                emit([item], "POS_Sell", shop, tb + rng.uniform(0.5, 72) * 3600)


def _step_of(event_type: str) -> str:
    if event_type == "Aggregation":
        return "Factory"
    if event_type.startswith("WMS"):
        return "WMS"
    if event_type.startswith("HUB"):
        return "Logistics_HUB"
    assert event_type in STEP_INDEX
    return event_type


def _split(group: list, rng: random.Random, low: int, high: int) -> list[list]:
    parts, i = [], 0
    while i < len(group):
        n = rng.randint(low, high)
        parts.append(group[i : i + n])
        i += n
    return parts


@dataclass
class Simulation:
    network: Network
    journeys: dict[str, list[Row]]
    incidents: list[Incident]

    def rows_in_arrival_order(self) -> list[Row]:
        rows = [r for journey in self.journeys.values() for r in journey]
        rows.sort(key=lambda r: r["_arrival"])
        return rows


def journeys_frame(journeys: dict[str, list[Row]]) -> pd.DataFrame:
    """Journeys as the scan frame `learn_reference` reads, in arrival order."""
    rows = sorted((r for j in journeys.values() for r in j), key=lambda r: r["_arrival"])
    return pd.DataFrame(
        {
            "epc": [r["epc_code"] for r in rows],
            "t": [r["_t"] for r in rows],
            "location": [str(r["location_id"]) for r in rows],
            "step": [STEP_INDEX[r["business_step"]] for r in rows],
            "etype": [EVENT_INDEX[r["event_type"]] for r in rows],
            "scan_location": [r["scan_location"] for r in rows],
        }
    )


def simulate(
    items: int,
    seed: int,
    settings: Settings,
    anomaly_share: float = 0.0,
    days: float = 14.0,
    start: datetime | None = None,
    shape: NetworkShape | None = None,
    network_seed: int = 1,
) -> Simulation:
    """Simulate `items` EPCs on the network of `network_seed`; inject incidents into
    `anomaly_share` of them. The same network seed gives the same sites and routes, so a
    model trained on one simulation can score another."""
    rng = random.Random(seed)
    network = build_network(shape or NetworkShape(), random.Random(network_seed))
    begin = start or datetime(2025, 7, 1, tzinfo=UTC)
    journeys = JourneySimulator(network, rng, begin, days).run(items)
    incidents: list[Incident] = []
    if anomaly_share > 0:
        locations = locations_frame(network)
        reference = learn_reference(journeys_frame(journeys), settings, locations)
        # Ground truth is the network as built, not what this sample happened to show:
        # an item sent along a rare but real supply route is not misrouted.
        reference.route_support = {edge: 1_000_000 for edge in supply_routes(network)}
        injector = Injector(reference, rng, settings.dup_window_s, settings.max_epc_age_days)
        incidents = injector.inject(journeys, anomaly_share)
    assign_event_ids(journeys)
    return Simulation(network, journeys, incidents)


def supply_routes(network: Network) -> set[tuple[str, str]]:
    """Every (origin, destination) the network ships along by design."""
    routes = set(network.warehouse_of.items())
    for supplies in (network.hubs_of, network.wholesalers_of, network.retailers_of):
        routes |= {(a, b) for a, targets in supplies.items() for b in targets}
    return routes


def locations_frame(network: Network) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "location_id": s.location_id,
                "scan_location": s.name,
                "latitude": round(s.lat, 6),
                "longitude": round(s.lon, 6),
                "business_step": BUSINESS_STEPS[[0, 1, 2, 3, 5][s.tier]],
            }
            for s in network.sites.values()
        ]
    )


def write_simulation(
    sim: Simulation, out: Path, event_ids: bool = True, separator: str = "\t"
) -> dict[str, Path]:
    """Write scans (raw export layout), `locations.csv` and, with incidents, `labels.csv`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = (["eventId"] if event_ids else []) + list(RAW_COLUMNS)
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter=separator, lineterminator="\n")
        writer.writerow(columns)
        for row in sim.rows_in_arrival_order():
            writer.writerow([row.get(c, "") for c in columns])
    paths = {"scans": out}
    locations = out.with_name("locations.csv")
    locations_frame(sim.network).to_csv(locations, index=False)
    paths["locations"] = locations
    labels = out.with_name(out.stem + ".labels.csv")
    with labels.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["event_id", "epc_code", "anomaly_type", "incident_id", "variant"])
        for inc in sim.incidents:
            for row in inc.rows:
                writer.writerow(
                    [
                        row["eventId"],
                        row["epc_code"],
                        inc.anomaly_type,
                        inc.incident_id,
                        inc.variant,
                    ]
                )
    paths["labels"] = labels
    return paths
