"""The network learned from history: sites, routes, hop-time bounds, registered company prefixes.

Nothing about a particular supply chain is written in code: `learn_reference` reads it from
scans. History is never spotless, so everything is counted with minimum support (a handful of
bad codes or odd shipments does not become normal) and bounds come from low quantiles scaled
down, never from the minimum.

A route below minimum support is judged against its origin's own regular routes: where a
distributor's regular customers each get only a few shipments (it supplies many shops), a route
seen once or twice is as thin as a regular one is often enough and counts as known; where its
regular routes carry many shipments each, one or two shipments to somewhere else are an oddity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from config import Settings
from detector.epc import EPC_PATTERN
from detector.schema import STEP_TIER

EARTH_RADIUS_KM = 6371.0


def haversine_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle distance between two (latitude, longitude) points.

    >>> round(haversine_km((37.5665, 126.9780), (35.1796, 129.0756)))
    325
    """
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = (
        math.sin((lat2 - lat1) / 2) ** 2
        + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(h))


# An origin's regular routes to a tier describe how thin a real route of it can be only when
# it has several; one route says nothing about the others.
MIN_REGULAR_ROUTES = 2


def poisson_cdf(k: int, rate: float) -> float:
    """P(X <= k) for X ~ Poisson(rate).

    >>> round(poisson_cdf(2, 4.0), 4), round(poisson_cdf(2, 18.0), 7)
    (0.2381, 2.8e-06)
    """
    if rate <= 0:
        return 1.0
    log_rate = math.log(rate)
    return min(1.0, sum(math.exp(i * log_rate - rate - math.lgamma(i + 1)) for i in range(k + 1)))


MEMO_MAX = 100_000


@dataclass
class Reference:
    """Learned reference data; lookups are dictionary reads, cheap enough per scan."""

    registered_prefixes: frozenset[str]
    site_tiers: dict[str, int]
    site_names: dict[str, str]
    coordinates: dict[str, tuple[float, float]]
    route_support: dict[tuple[str, str], int]
    route_bound_s: dict[tuple[str, str], float]
    tier_bound_s: dict[tuple[int, int], float]
    transitions: frozenset[tuple[int, int]]
    min_route_support: int
    max_speed_kmh: float
    stats: dict[str, Any] = field(default_factory=dict)
    # Memos per hop: a network has few routes and they repeat all day. Cleared when large, so
    # a stream of made-up site ids cannot grow them without bound.
    _ratios: dict[tuple[str, str, int, int], float | None] = field(
        default_factory=dict, repr=False, compare=False
    )
    _bounds: dict[tuple[str, str, int, int], tuple[float, str]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def origin_shipments(self, origin: str) -> int:
        return self.stats.get("origin_shipments", {}).get(origin, 0)

    def route_known(self, origin: str, destination: str) -> bool:
        """Seen often enough: absolutely, as a share of what its origin ships, or as often as
        the origin's regular routes to that tier are likely to be seen.

        A quiet distributor's real customers are seen only a few times each; one odd shipment
        from a busy one is a tiny share of its traffic. A distributor with many customers ships
        to each of them rarely, so a route it used once or twice is as thin as a regular one
        of its routes often is; the same count beside regular routes of twenty shipments each is
        an oddity. A route never seen is never known.
        """
        support = self.route_support.get((origin, destination), 0)
        if support >= self.min_route_support:
            return True
        if support <= 0:
            return False
        share = self.stats.get("min_route_share", 1.0)
        if support >= share * self.origin_shipments(origin):
            return True
        regular = self.regular_route_shipments(origin, destination)
        if regular is None:
            return False
        plausibility = self.stats.get("min_route_plausibility", 1.0)
        return poisson_cdf(support, regular) >= plausibility

    def regular_route_shipments(self, origin: str, destination: str) -> float | None:
        """Median shipments of the origin's known routes to the destination's tier.

        None when the origin has fewer than `MIN_REGULAR_ROUTES` such routes, or the
        destination is not further down the chain than the origin.
        """
        tier = self.site_tiers.get(destination)
        if tier is None:
            return None
        by_tier = self.stats.get("regular_route_shipments", {}).get(origin)
        return by_tier.get(str(tier)) if by_tier else None

    def hop_bound(
        self, origin: str, destination: str, origin_tier: int, destination_tier: int
    ) -> tuple[float, str]:
        """The fastest believable hop in seconds and where that bound comes from."""
        key = (origin, destination, origin_tier, destination_tier)
        bound = self._bounds.get(key)
        if bound is None:
            if len(self._bounds) >= MEMO_MAX:
                self._bounds.clear()
            bound = self._bounds[key] = self._hop_bound(*key)
        return bound

    def _hop_bound(
        self, origin: str, destination: str, origin_tier: int, destination_tier: int
    ) -> tuple[float, str]:
        learned = self.route_bound_s.get((origin, destination))
        source = "route"
        if learned is None:
            learned = self.tier_bound_s.get((origin_tier, destination_tier), 0.0)
            source = "step"
        a = self.coordinates.get(origin)
        b = self.coordinates.get(destination)
        if a is not None and b is not None:
            physical = haversine_km(a, b) / self.max_speed_kmh * 3600.0
            if physical >= learned:
                return physical, "distance"
        return learned, source

    def distance_ratio(
        self, origin: str, destination: str, origin_tier: int, destination_tier: int
    ) -> float | None:
        """Hop distance over the median distance of known routes between the same tiers.

        Suppliers serve nearby sites, so a hop much longer than usual for its tiers is a hint
        of a wrong destination; None without coordinates.
        """
        key = (origin, destination, origin_tier, destination_tier)
        if key not in self._ratios:
            if len(self._ratios) >= MEMO_MAX:
                self._ratios.clear()
            a = self.coordinates.get(origin)
            b = self.coordinates.get(destination)
            tiers = f"{origin_tier}-{destination_tier}"
            typical = self.stats.get("tier_median_km", {}).get(tiers)
            self._ratios[key] = (
                haversine_km(a, b) / typical
                if a is not None and b is not None and typical
                else None
            )
        return self._ratios[key]

    def to_json(self) -> dict[str, Any]:
        return {
            "registered_prefixes": sorted(self.registered_prefixes),
            "site_tiers": self.site_tiers,
            "site_names": self.site_names,
            "coordinates": {k: list(v) for k, v in self.coordinates.items()},
            "routes": [
                [a, b, n, self.route_bound_s.get((a, b))]
                for (a, b), n in sorted(self.route_support.items())
            ],
            "tier_bound_s": [[a, b, s] for (a, b), s in sorted(self.tier_bound_s.items())],
            "transitions": sorted(list(t) for t in self.transitions),
            "min_route_support": self.min_route_support,
            "max_speed_kmh": self.max_speed_kmh,
            "stats": self.stats,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Reference:
        return cls(
            registered_prefixes=frozenset(data["registered_prefixes"]),
            site_tiers={k: int(v) for k, v in data["site_tiers"].items()},
            site_names=dict(data["site_names"]),
            coordinates={k: (float(v[0]), float(v[1])) for k, v in data["coordinates"].items()},
            route_support={(a, b): int(n) for a, b, n, _ in data["routes"]},
            route_bound_s={(a, b): float(s) for a, b, _, s in data["routes"] if s is not None},
            tier_bound_s={(int(a), int(b)): float(s) for a, b, s in data["tier_bound_s"]},
            transitions=frozenset((int(a), int(b)) for a, b in data["transitions"]),
            min_route_support=int(data["min_route_support"]),
            max_speed_kmh=float(data["max_speed_kmh"]),
            stats=dict(data.get("stats", {})),
        )


def learn_reference(
    history: pd.DataFrame, settings: Settings, locations: pd.DataFrame | None = None
) -> Reference:
    """Learn the network from scans in arrival order.

    `history` has one row per scan with columns `epc`, `t` (epoch s), `location`, `step`,
    `etype` and `scan_location`; row order is arrival order. `locations`, when given, has
    `location_id`, `latitude`, `longitude`.
    """
    frame = history.reset_index(drop=True)
    tiers = np.asarray(STEP_TIER)[frame["step"].to_numpy()]
    frame = frame.assign(tier=tiers)

    prefixes = _registered_prefixes(frame["epc"], settings)
    site_tiers = frame.groupby("location")["tier"].agg(lambda s: int(s.mode().iloc[0])).to_dict()
    site_names = frame.groupby("location")["scan_location"].first().to_dict()

    by_epc = frame.groupby("epc", sort=False)
    prev = pd.DataFrame(
        {
            "location": by_epc["location"].shift(),
            "t": by_epc["t"].shift(),
            "tier": by_epc["tier"].shift(),
            "etype": by_epc["etype"].shift(),
        }
    )
    has_prev = prev["location"].notna()
    transitions = _supported_pairs(
        prev.loc[has_prev, "etype"].astype(int),
        frame.loc[has_prev, "etype"],
        prev.loc[has_prev, "t"],
        settings.min_route_support,
    )

    moved = has_prev & (prev["location"] != frame["location"])
    hops = pd.DataFrame(
        {
            "origin": prev.loc[moved, "location"],
            "destination": frame.loc[moved, "location"],
            "origin_tier": prev.loc[moved, "tier"].astype(int),
            "destination_tier": frame.loc[moved, "tier"],
            "departed": prev.loc[moved, "t"],
            "hop_s": frame.loc[moved, "t"] - prev.loc[moved, "t"],
        }
    )
    forward = hops[hops["hop_s"] > 0]
    q = settings.hop_bound_quantile
    factor = settings.hop_bound_factor

    # Support counts shipments (distinct departure times), not items: a pallet of 60 EPCs on
    # an odd route is one odd shipment.
    route_support = hops.groupby(["origin", "destination"])["departed"].nunique().to_dict()
    route_q = forward.groupby(["origin", "destination"])["hop_s"].quantile(q)
    route_bound = {
        key: float(value) * factor
        for key, value in route_q.items()
        if route_support.get(key, 0) >= settings.min_route_bound_shipments
    }
    tier_q = forward.groupby(["origin_tier", "destination_tier"])["hop_s"].quantile(q)
    tier_bound = {(int(a), int(b)): float(v) * factor for (a, b), v in tier_q.items()}

    origin_shipments = hops.groupby("origin")["departed"].nunique()
    coordinates: dict[str, tuple[float, float]] = {}
    if locations is not None:
        for row in locations.itertuples(index=False):
            coordinates[str(row.location_id)] = (float(row.latitude), float(row.longitude))

    tier_median_km = _tier_median_km(hops, route_support, coordinates, settings.min_route_support)
    site_tier_of = {str(k): int(v) for k, v in site_tiers.items()}
    regular = _regular_route_shipments(route_support, site_tier_of, settings.min_route_support)
    return Reference(
        registered_prefixes=prefixes | frozenset(settings.registered_prefixes),
        site_tiers=site_tier_of,
        site_names={str(k): str(v) for k, v in site_names.items()},
        coordinates=coordinates,
        route_support={(str(a), str(b)): int(n) for (a, b), n in route_support.items()},
        route_bound_s={(str(a), str(b)): v for (a, b), v in route_bound.items()},
        tier_bound_s=tier_bound,
        transitions=transitions,
        min_route_support=settings.min_route_support,
        max_speed_kmh=settings.max_speed_kmh,
        stats={
            "scans": len(frame),
            "epcs": int(frame["epc"].nunique()),
            "sites": len(site_tiers),
            "routes_known": sum(
                1 for n in route_support.values() if n >= settings.min_route_support
            ),
            "registered_prefixes": len(prefixes),
            "origin_shipments": {str(k): int(v) for k, v in origin_shipments.items()},
            "tier_median_km": tier_median_km,
            "min_route_share": settings.min_route_share,
            "regular_route_shipments": regular,
            "min_route_plausibility": settings.min_route_plausibility,
        },
    )


def _registered_prefixes(epcs: pd.Series, settings: Settings) -> frozenset[str]:
    unique = pd.Series(epcs.unique())
    companies = unique.str.extract(EPC_PATTERN)[[0, 1]].dropna()
    companies = companies[companies[0] == "001"][1]
    counts = companies.value_counts()
    needed = max(settings.min_prefix_support_epcs, settings.min_prefix_support_share * len(unique))
    return frozenset(str(c) for c, n in counts.items() if n >= needed)


def _supported_pairs(
    first: pd.Series, second: pd.Series, departed: pd.Series, min_support: int
) -> frozenset[tuple[int, int]]:
    pairs = pd.DataFrame({"a": first.to_numpy(), "b": second.to_numpy(), "d": departed.to_numpy()})
    support = pairs.groupby(["a", "b"])["d"].nunique()
    return frozenset((int(a), int(b)) for (a, b), n in support.items() if n >= min_support)


def _regular_route_shipments(
    route_support: dict, site_tiers: dict[str, int], min_support: int
) -> dict[str, dict[str, float]]:
    """Per origin and destination tier further down the chain: median shipments of its known
    routes, where it has at least `MIN_REGULAR_ROUTES` of them."""
    supports: dict[tuple[str, int], list[int]] = {}
    for (origin, destination), n in route_support.items():
        a, b = site_tiers.get(str(origin)), site_tiers.get(str(destination))
        if n >= min_support and a is not None and b is not None and b > a:
            supports.setdefault((str(origin), b), []).append(int(n))
    regular: dict[str, dict[str, float]] = {}
    for (origin, tier), counts in sorted(supports.items()):
        if len(counts) >= MIN_REGULAR_ROUTES:
            regular.setdefault(origin, {})[str(tier)] = float(np.median(counts))
    return regular


def _tier_median_km(
    hops: pd.DataFrame,
    route_support: dict,
    coordinates: dict[str, tuple[float, float]],
    min_support: int,
) -> dict[str, float]:
    """Median length of the known routes between each pair of tiers, where coordinates exist."""
    lengths: dict[str, list[float]] = {}
    pairs = hops[["origin", "destination", "origin_tier", "destination_tier"]].drop_duplicates()
    for row in pairs.itertuples(index=False):
        a, b = coordinates.get(str(row.origin)), coordinates.get(str(row.destination))
        if (
            a is None
            or b is None
            or route_support.get((row.origin, row.destination), 0) < min_support
        ):
            continue
        key = f"{int(row.origin_tier)}-{int(row.destination_tier)}"
        lengths.setdefault(key, []).append(haversine_km(a, b))
    return {k: float(np.median(v)) for k, v in lengths.items() if np.median(v) > 0}
