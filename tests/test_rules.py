"""Each rule, with the traps the design lists as explicit cases."""

from __future__ import annotations

from datetime import datetime, timedelta

from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from tests.conftest import GOOD_EPC, HOP_BOUND_S, JOURNEY, Runner, make_scan

T0 = datetime(2025, 7, 1, 8, 0, 0)


def at(minutes: float) -> str:
    return (T0 + timedelta(minutes=minutes)).strftime("%Y-%m-%d %H:%M:%S")


def walk(runner: Runner, steps, gaps_min, epc: str = GOOD_EPC) -> list[dict]:
    t, found = 0.0, []
    for (event_type, step, site), gap in zip(steps, gaps_min, strict=False):
        t += gap
        found.append(runner.feed(make_scan(event_type, step, site, at(t), epc)))
    return found


def test_full_clean_journey_raises_nothing(runner):
    assert walk(runner, JOURNEY, [0] + [60] * 9) == [{}] * 10


def test_item_that_stops_mid_journey_is_not_an_error(runner):
    assert walk(runner, JOURNEY[:4], [0, 60, 60, 60]) == [{}] * 4


def test_pallet_sharing_a_timestamp_is_not_a_duplicate(runner):
    for serial in range(50):
        epc = GOOD_EPC[:-3] + f"{serial:03d}"
        assert walk(runner, JOURNEY[:3], [0, 60, 60], epc) == [{}] * 3


def test_rescan_at_the_same_place_is_not_a_duplicate(runner):
    runner.feed(make_scan("WMS_Inbound", "WMS", "W1", at(0)))
    assert runner.feed(make_scan("WMS_Inbound", "WMS", "W1", at(0.5))) == {}


def test_two_places_within_the_dup_window_is_a_clone(runner):
    runner.feed(make_scan("HUB_Inbound", "Logistics_HUB", "H1", at(0)))
    found = runner.feed(make_scan("HUB_Inbound", "Logistics_HUB", "H2", at(0.5)))
    assert set(found) == {"epcDup"}
    assert found["epcDup"]["seconds_apart"] == 30
    assert found["epcDup"]["other_location"] == "H1"


def test_two_places_just_outside_the_dup_window_is_not_a_clone(runner):
    walk(runner, JOURNEY[:4], [0, 60, 60, 60])
    found = runner.feed(make_scan("HUB_Outbound", "Logistics_HUB", "H1", at(181 + 1.5)))
    assert "epcDup" not in found


def test_slow_hop_is_never_a_jump(runner):
    found = walk(runner, JOURNEY[:4], [0, 60 * 24 * 20, 60, 60 * 24 * 9])
    assert found == [{}] * 4


def test_fast_hop_is_a_jump_with_its_bound(runner):
    found = walk(runner, JOURNEY[:4], [0, 60, 60, 10])
    assert set(found[3]) == {"jump"}
    assert found[3]["jump"]["hop_s"] == 600
    assert found[3]["jump"]["bound_s"] == HOP_BOUND_S


def test_back_dated_scan_is_an_order_error_even_though_sorting_would_hide_it(runner):
    walk(runner, JOURNEY[:2], [0, 60])
    found = runner.feed(make_scan("WMS_Outbound", "WMS", "W1", at(30)))
    assert found["evtOrderErr"]["problem"] == "time_before_previous"


def test_outbound_without_inbound_at_that_site(runner):
    walk(runner, JOURNEY[:3], [0, 60, 60])
    found = runner.feed(make_scan("HUB_Outbound", "Logistics_HUB", "H1", at(400)))
    assert found["evtOrderErr"]["problem"] == "outbound_without_inbound"


def test_inbound_at_new_site_without_outbound_from_previous(runner):
    walk(runner, JOURNEY[:2], [0, 60])
    found = runner.feed(make_scan("HUB_Inbound", "Logistics_HUB", "H1", at(400)))
    assert found["evtOrderErr"]["problem"] == "inbound_without_outbound"


def test_going_back_to_a_hub_after_a_wholesaler_is_a_location_error(runner):
    walk(runner, JOURNEY[:7], [0, 60, 60, 60, 60, 60, 60])
    found = runner.feed(make_scan("HUB_Inbound", "Logistics_HUB", "H1", at(2000)))
    assert found["locErr"]["problem"] == "step_regression"


def test_retailer_not_supplied_by_that_wholesaler_is_a_location_error(runner):
    walk(runner, JOURNEY[:7], [0, 60, 60, 60, 60, 60, 60])
    found = runner.feed(make_scan("R_Stock_Inbound", "R_Stock_Inbound", "R2", at(2000)))
    assert found["locErr"]["problem"] == "unknown_route"


def test_fake_epc_is_flagged_on_every_scan(runner):
    fake = "001.9999999.3842332.100006.20250701.000008002"
    found = walk(runner, JOURNEY[:3], [0, 60, 60], fake)
    assert all(f["epcFake"]["defects"] == ["company"] for f in found)


def test_manufacture_date_after_first_scan_uses_event_time_not_wall_clock(runner):
    epc = GOOD_EPC.replace("20250701", "20250705")
    assert walk(runner, JOURNEY[:1], [0], epc)[0]["epcFake"]["defects"] == ["made_after_first_scan"]


@hsettings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    stop=st.integers(min_value=2, max_value=10),
    gaps=st.lists(
        st.floats(min_value=HOP_BOUND_S / 60 + 1, max_value=60 * 24 * 30), min_size=10, max_size=10
    ),
    pallet=st.integers(min_value=1, max_value=5),
)
def test_random_valid_journeys_raise_no_alert(reference, settings, stop, gaps, pallet):
    runner = Runner(reference, settings)
    for serial in range(pallet):
        epc = GOOD_EPC[:-3] + f"{serial:03d}"
        assert walk(runner, JOURNEY[:stop], [0] + gaps[: stop - 1], epc) == [{}] * stop
