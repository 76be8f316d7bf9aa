"""Nothing lost, nothing doubled: killed processes, group changes, shutdown, bad input, state.

Every test runs real detector processes against the real broker and kills them for real.
"""

from __future__ import annotations

import dataclasses
import random
import signal
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime

import numpy as np
import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from config import Settings
from consumer.state import WindowStore
from detector.features import Featurizer
from detector.reference import Reference
from producer.kafka import make_producer
from producer.publish import publish_scans
from producer.readers import read_scans
from producer.simulate import simulate, write_simulation
from tests.conftest import make_scan
from tests.kafka_support import (
    check_alerts_against_labels,
    committed_all,
    isolated_settings,
    read_alerts,
    read_all,
    run_detector,
    start_detector,
    wait_until_consuming,
)

STREAM_START = datetime(2025, 7, 20, tzinfo=UTC)


def _store(max_epcs: int = 100, ttl_s: float = 1e9, window_scans: int = 12) -> WindowStore:
    return WindowStore(window_scans, 32, frozenset({"8805843"}), max_epcs, ttl_s)


def _apply(store: WindowStore, scans: list, partition: int = 0, first_offset: int = 0):
    featurizer = Featurizer(Reference.from_json(EMPTY_REFERENCE), Settings())
    done = featurizer.batch(store, scans)
    n = len(scans)
    store.mark(done.slots, np.full(n, partition), np.arange(first_offset, first_offset + n))
    return done


EMPTY_REFERENCE = {
    "registered_prefixes": ["8805843"],
    "site_tiers": {},
    "site_names": {},
    "coordinates": {},
    "routes": [],
    "tier_bound_s": [],
    "transitions": [],
    "min_route_support": 3,
    "max_speed_kmh": 150.0,
}


@pytest.mark.parametrize(
    ("long_site", "long_id"),
    [
        ("a-site-name-longer-than-sixteen", "an-event-id-much-longer-than-sixteen-bytes"),
        # Their tokens' hashes end in a NUL byte, which numpy's fixed-width bytes drop: these
        # came back as garbled names after a restart and raised false alerts.
        ("Warehouse-Very-Long-Site-Name-00323", "urn:epc:event:long-event-id-bad-00421"),
    ],
)
def test_window_round_trips_through_the_changelog_codec(long_site, long_id):
    epc = "001.8805843.3842332.100006.20250701.000008002"
    store = _store()
    scans = [
        make_scan("Aggregation", "Factory", "101", "2025-07-01 10:00:00", epc),
        make_scan("WMS_Inbound", "WMS", long_site, "2025-07-01 12:00:00", epc),
        make_scan("WMS_Inbound", "WMS", "205", "2025-07-01 12:00:30", epc),  # a clone read
    ]
    scans[1].event_id = long_id
    _apply(store, scans, partition=2, first_offset=39)
    slot = store.slot_of[epc]
    assert store.event_id(bytes(store.eid[slot, 10])) == long_id  # in memory, before any restore
    store.hidden[slot] = np.arange(64, dtype=np.float32)
    records = store.take_changes()
    assert [(e, p) for e, p, _ in records] == [(epc, 2)]

    back = _store()
    assert back.restore(records) == 1
    again = back.slot_of[epc]
    for name in ("count", "first_t", "last_t", "offset", "partition", "hidden", "t", "side"):
        assert np.array_equal(getattr(back, name)[again], getattr(store, name)[slot]), name
    held = slice(12 - 3, 12)
    sites = [back.sites.names[i] for i in back.loc[again, held]]
    assert sites == ["101", long_site, "205"]
    ids = [back.event_id(bytes(raw)) for raw in back.eid[again, held]]
    assert ids == [s.event_id for s in scans]
    assert back.side[again, held].tolist() == [False, False, True]
    assert back.applied(epc, 2, 41) and not back.applied(epc, 2, 42)


def test_a_restored_window_of_another_length_keeps_its_newest_scans():
    epc = "001.8805843.3842332.100006.20250701.000008002"
    store = _store(window_scans=12)
    steps = [("Aggregation", "Factory"), ("WMS_Inbound", "WMS"), ("WMS_Outbound", "WMS")]
    times = ["2025-07-01 10:00:00", "2025-07-01 12:00:00", "2025-07-01 14:00:00"]
    _apply(store, [make_scan(e, s, "101", t, epc) for (e, s), t in zip(steps, times, strict=True)])
    short = _store(window_scans=2)
    short.restore(store.take_changes())
    slot = short.slot_of[epc]
    assert short.count[slot] == 2
    assert short.etype[slot].tolist() == [1, 2]


def test_an_unreadable_changelog_record_is_skipped_and_the_rest_restored():
    epc = "001.8805843.3842332.100006.20250701.000008002"
    store = _store()
    _apply(store, [make_scan("Aggregation", "Factory", "101", "2025-07-01 10:00:00", epc)])
    records = store.take_changes() + [("001.8805843.3842332.100006.20250701.9", 0, b"\x01{}")]
    back = _store()
    assert back.restore(records) == 1 and epc in back


def test_a_restore_keeps_the_changes_pending_for_windows_already_held():
    """Taking over partitions between two checkpoints must not forget what changed since the
    last one in the partitions already owned: their offsets are committed at the next one."""
    epc = "001.8805843.3842332.100006.20250701.{:09d}".format
    other = _store()
    _apply(other, [make_scan("Aggregation", "Factory", "101", "2025-07-01 10:00:00", epc(1))], 1)
    records = other.take_changes()  # partition 1's changelog, as another member left it

    store = _store(ttl_s=3600)
    _apply(store, [make_scan("Aggregation", "Factory", "101", "2025-07-01 08:00:00", epc(2))], 0)
    _apply(store, [make_scan("Aggregation", "Factory", "101", "2025-07-01 10:00:00", epc(3))], 0)
    assert store.expire() == 1  # epc 2: a tombstone pending too
    assert store.restore(records) == 1
    pending = {key: value is not None for key, _, value in store.take_changes()}
    assert pending == {epc(2): False, epc(3): True}  # the restored window is not written back


def test_records_restored_together_give_the_windows_of_records_restored_one_by_one():
    rng = np.random.default_rng(3)
    steps = [("Aggregation", "Factory"), ("WMS_Inbound", "WMS"), ("WMS_Outbound", "WMS")]
    sites = ["101", "205", "Warehouse-With-A-Long-Name-0042", "é-site", "S9"]
    store = _store(max_epcs=10_000)
    scans = []
    for i in range(300):
        epc = f"{'999' if i % 17 == 0 else '001'}.8805843.3842332.100006.20250701.{i:09d}"
        for k in range(int(rng.integers(1, 16))):  # past the window's 12 too
            event, step = steps[k % 3]
            site = sites[int(rng.integers(0, len(sites)))] if i % 5 == 0 else sites[k % 2]
            when = f"2025-07-0{1 + k // 8} {10 + k % 8}:{i % 60:02d}:00"
            scan = make_scan(event, step, site, when, epc)  # a long event id
            if i % 7:
                scan = dataclasses.replace(scan, event_id=f"{i:08x}{k:08x}")  # one that fits
            scans.append(scan)
    for start in range(0, len(scans), 97):
        partition = int(rng.integers(0, 4))
        _apply(store, scans[start : start + 97], partition=partition, first_offset=start)
    records = [(e, p, v) for e, p, v in store.take_changes() if v is not None]

    rest = _store(max_epcs=10_000)._apply_together(records)
    assert 0 < len(rest) < len(records) / 2  # most together; long and non-ASCII names one by one
    together, one_by_one = _store(max_epcs=10_000), _store(max_epcs=10_000)
    assert together._apply(records) == one_by_one._apply(records, together=False) == 300
    assert set(together.slot_of) == set(one_by_one.slot_of) == set(store.slot_of)
    for epc in store.slot_of:
        a, b = together.slot_of[epc], one_by_one.slot_of[epc]
        held = slice(together.size - int(together.count[a]), together.size)
        assert together.count[a] == one_by_one.count[b]
        for name in ("offset", "first_t", "last_t", "partition", "defects"):
            assert getattr(together, name)[a] == getattr(one_by_one, name)[b], name
        np.testing.assert_array_equal(together.made_at[a], one_by_one.made_at[b])
        np.testing.assert_array_equal(together.hidden[a], one_by_one.hidden[b])
        for name in ("t", "tier", "etype", "side", "eid"):
            np.testing.assert_array_equal(
                getattr(together, name)[a, held], getattr(one_by_one, name)[b, held], name
            )
        assert [together.sites.names[x] for x in together.loc[a, held]] == [
            one_by_one.sites.names[x] for x in one_by_one.loc[b, held]
        ]
        assert together.event_id(together.eid[a, -1]) == one_by_one.event_id(one_by_one.eid[b, -1])
    assert together.watermark == one_by_one.watermark


def test_store_bounds_count_evictions_and_expiry_and_emit_tombstones():
    store = _store(max_epcs=3, ttl_s=100)
    epcs = [f"001.8805843.3842332.100006.20250701.00000000{i}" for i in range(5)]
    for i, epc in enumerate(epcs):
        t = f"2025-07-01 10:00:{i:02d}"
        _apply(store, [make_scan("Aggregation", "Factory", "101", t, epc)], i % 2, i)
        store.bound()
    assert len(store) == 3 and store.evicted == 2
    assert set(store.slot_of) == set(epcs[2:])  # the least recently updated went first
    _apply(store, [make_scan("Aggregation", "Factory", "101", "2025-07-01 10:05:00", "e9")], 0, 9)
    assert store.expire() == 3  # the others are more than 100 s of event time behind
    records = store.take_changes()
    assert {epc for epc, _, value in records if value is None} == set(epcs)
    assert [epc for epc, _, value in records if value is not None] == ["e9"]
    assert store.applied("e9", 0, 9) and not store.applied("e9", 0, 10)


def _publish_slowly(settings, path, rate: float) -> threading.Thread:
    thread = threading.Thread(
        target=publish_scans,
        args=(read_scans(path), settings),
        kwargs={"rate_per_s": rate, "show_progress": False},
        daemon=True,
    )
    thread.start()
    return thread


def _wait_committed(settings, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not committed_all(settings):
        assert time.monotonic() < deadline, "the group never caught up"
        time.sleep(1.0)


def _kill_repeatedly(settings, kills: int, seed: int) -> None:
    """Start a detector and SIGKILL it 3-5 s later, `kills` times (at random points of work)."""
    rng = random.Random(seed)
    done = 0
    while done < kills:
        detector = start_detector(settings)
        time.sleep(rng.uniform(3.0, 5.0))
        if detector.poll() is None:
            detector.send_signal(signal.SIGKILL)
            detector.wait(30)
            done += 1


def _duplicates_share_ids(alerts: list[dict]) -> None:
    ids_per_alert: dict[tuple[str, str], set[str]] = defaultdict(set)
    for alert in alerts:
        ids_per_alert[(alert["event_id"], alert["anomaly_type"])].add(alert["alert_id"])
    assert all(len(ids) == 1 for ids in ids_per_alert.values())


@pytest.mark.integration
@pytest.mark.slow
def test_sigkill_five_times_while_the_stream_flows_loses_no_alert(trained_model, tmp_path):
    settings = isolated_settings(trained_model, batch_max_messages=300, session_timeout_s=10)
    stream = simulate(2500, 21, settings, 0.06, days=5, start=STREAM_START)
    paths = write_simulation(stream, tmp_path / "stream.tsv")
    publisher = _publish_slowly(settings, paths["scans"], rate=700)
    _kill_repeatedly(settings, kills=5, seed=5)
    publisher.join(120)
    final = run_detector(settings, idle_exit_s=6.0)
    assert final.returncode == 0, final.stderr[-3000:]
    assert committed_all(settings), final.stderr[-3000:]

    alerts = read_alerts(settings)
    check_alerts_against_labels(alerts, stream.incidents)
    _duplicates_share_ids(alerts)


@pytest.mark.integration
@pytest.mark.slow
def test_exactly_once_with_kills_has_no_duplicates(trained_model, tmp_path):
    settings = isolated_settings(
        trained_model,
        batch_max_messages=300,
        processing_guarantee="exactly_once",
        session_timeout_s=10,
    )
    stream = simulate(1500, 22, settings, 0.06, days=5, start=STREAM_START)
    paths = write_simulation(stream, tmp_path / "stream.tsv")
    publisher = _publish_slowly(settings, paths["scans"], rate=700)
    _kill_repeatedly(settings, kills=3, seed=6)
    publisher.join(120)
    final = run_detector(settings, idle_exit_s=6.0)
    assert final.returncode == 0, final.stderr[-3000:]
    alerts = read_alerts(settings)  # read_committed: aborted transactions are invisible
    keys = [(a["event_id"], a["anomaly_type"]) for a in alerts]
    assert len(keys) == len(set(keys)), "exactly-once produced a duplicate alert"
    check_alerts_against_labels(alerts, stream.incidents)


def _open_transaction(settings, transactional_id: str, topic: str, timeout_ms: int = 60_000):
    """A transaction left open on every partition of `topic`, as a killed detector leaves one."""
    from confluent_kafka import Producer

    zombie = Producer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "transactional.id": transactional_id,
            "transaction.timeout.ms": timeout_ms,
        }
    )
    zombie.init_transactions(30)
    zombie.begin_transaction()
    for p in range(settings.topic_partitions):
        zombie.produce(topic, key=b"zombie", value=b"never committed", partition=p)
    assert zombie.flush(30) == 0
    return zombie


@pytest.mark.integration
def test_a_restarted_exactly_once_detector_fences_its_killed_predecessors_transaction(
    trained_model,
):
    """Its alerts are readable at once, not after the broker times the open transaction out."""
    from consumer.instance import claim_instance, transactional_id

    settings = isolated_settings(trained_model, processing_guarantee="exactly_once")
    # The predecessor held this host's first slot of the group, then died mid-transaction.
    predecessor = claim_instance(settings.group_id)
    _open_transaction(
        settings, transactional_id(settings.group_id, predecessor), settings.topic_alerts
    )
    predecessor.release()

    forged = "999.8805843.3842332.100006.20250701.000000001"  # header 999 does not exist
    producer = make_producer(settings)
    record = {
        "epc_code": forged,
        "event_time": "2025-07-20 10:00:00",
        "location_id": "100",
        "business_step": "Factory",
        "event_type": "Aggregation",
    }
    producer.produce(settings.topic_scans, key=forged.encode(), value=orjson.dumps(record))
    assert producer.flush(30) == 0
    run = run_detector(settings, idle_exit_s=3.0)
    assert run.returncode == 0, run.stderr[-3000:]
    # The open transaction would hold every alert partition back for 60 s.
    alerts = read_alerts(settings, timeout_s=10.0)
    assert [(a["epc_code"], a["anomaly_type"]) for a in alerts] == [(forged, "epcFake")]


@pytest.mark.integration
def test_a_restore_waits_for_an_open_transaction_instead_of_missing_later_commits():
    from confluent_kafka import Producer

    from consumer.state import read_changelog
    from tests.kafka_support import isolated_settings as fresh

    settings = fresh(__import__("pathlib").Path("unused"))
    topic = settings.topic_state
    zombie = _open_transaction(settings, f"zombie-{settings.group_id}", topic)
    later = Producer(
        {"bootstrap.servers": settings.bootstrap_servers, "transactional.id": f"later-{topic}"}
    )
    later.init_transactions(30)
    later.begin_transaction()
    later.produce(topic, key=b"epc-later", value=b"committed", partition=0)
    later.commit_transaction(30)
    # The zombie's transaction ends (here: aborted) a little after the restore began.
    threading.Timer(2.0, zombie.abort_transaction, args=(30,)).start()
    records = list(read_changelog(settings.bootstrap_servers, topic, range(4)))
    assert records == [("epc-later", 0, b"committed")]


def _scan_record(epc: str, when: str, step: str = "Factory", event: str = "Aggregation") -> bytes:
    return orjson.dumps(
        {
            "epc_code": epc,
            "event_time": when,
            "location_id": "100",
            "business_step": step,
            "event_type": event,
        }
    )


def _publish_keyed(settings, count: int) -> None:
    """`count` first scans of distinct EPCs, keyed by EPC (so spread over the partitions)."""
    producer = make_producer(settings)
    epc = "001.8805843.3842332.100006.20250701.{:09d}".format
    for i in range(count):
        value = _scan_record(epc(i), "2025-07-10 12:00:00")
        producer.produce(settings.topic_scans, key=epc(i).encode(), value=value)
    assert producer.flush(30) == 0


def _stopped(run) -> dict:
    line = next(line for line in run.stderr.splitlines() if '"detector_stopped"' in line)
    return orjson.loads(line)


@pytest.mark.integration
def test_late_scans_go_to_the_late_topic_and_do_not_move_the_watermark(trained_model):
    settings = isolated_settings(trained_model, max_lateness_s=86400.0)
    epc = "001.8805843.3842332.100006.20250701.{:09d}".format
    messages = [  # all in partition 0, in this order
        _scan_record(epc(1), "2025-07-10 12:00:00"),  # the partition's event time: 07-10 12:00
        _scan_record(epc(2), "2025-07-09 11:00:00"),  # 25 h behind: late
        b"not json",  # to the DLQ, between the two
        _scan_record(epc(3), "2025-07-09 13:00:00"),  # 23 h behind: in time
        _scan_record(epc(4), "2025-07-08 00:00:00"),  # late; did not move the watermark back
        _scan_record(epc(5), "2025-07-11 00:00:00"),  # moves it on
        _scan_record(epc(6), "2025-07-09 23:00:00"),  # 25 h behind the new one: late
    ]
    producer = make_producer(settings)
    for value in messages:
        producer.produce(settings.topic_scans, value=value, partition=0)
    assert producer.flush(30) == 0

    run = run_detector(settings, idle_exit_s=3.0)
    assert run.returncode == 0, run.stderr[-3000:]
    # Unkeyed, as they came: spread over the late topic's partitions, so ordered by source.
    late = read_all(settings, settings.topic_late)
    late.sort(key=lambda m: int(dict(m.headers())["source_offset"]))
    assert [orjson.loads(m.value())["epc_code"] for m in late] == [epc(2), epc(4), epc(6)]
    assert [dict(m.headers())["source_offset"] for m in late] == [b"1", b"4", b"6"]
    assert all(b"max_lateness_s=86400" in dict(m.headers())["reason"] for m in late)
    assert [m.value() for m in read_all(settings, settings.topic_dlq)] == [b"not json"]
    stopped = _stopped(run)
    assert (stopped["late"], stopped["dead_lettered"], stopped["scored"]) == (3, 1, 3)


@pytest.mark.integration
def test_input_read_again_from_the_start_is_recognised_as_already_applied(trained_model):
    """Offsets rewound below what the windows hold (as after a crash between the changelog and
    the commit): those scans are not applied twice and raise no alert again."""
    settings = isolated_settings(trained_model)
    forged = "999.8805843.3842332.100006.20250701.000000001"
    producer = make_producer(settings)
    for i, (step, event) in enumerate(
        [("Factory", "Aggregation"), ("WMS", "WMS_Inbound"), ("WMS", "WMS_Outbound")]
    ):
        value = _scan_record(forged, f"2025-07-10 1{i}:00:00", step, event)
        producer.produce(settings.topic_scans, key=forged.encode(), value=value)
    assert producer.flush(30) == 0
    first = run_detector(settings, idle_exit_s=3.0)
    assert first.returncode == 0, first.stderr[-3000:]
    alerts = read_alerts(settings)
    assert len(alerts) == 3 and {a["anomaly_type"] for a in alerts} == {"epcFake"}

    rewind = Consumer(
        {"bootstrap.servers": settings.bootstrap_servers, "group.id": settings.group_id}
    )
    partitions = range(settings.topic_partitions)
    rewind.commit(
        offsets=[TopicPartition(settings.topic_scans, p, 0) for p in partitions],
        asynchronous=False,
    )
    rewind.close()
    again = run_detector(settings, idle_exit_s=3.0)
    assert again.returncode == 0, again.stderr[-3000:]
    stopped = _stopped(again)
    assert (stopped["consumed"], stopped["replayed"], stopped["scored"]) == (3, 3, 0)
    assert len(read_alerts(settings)) == 3


@pytest.mark.integration
@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_a_batch_that_fails_is_not_committed_when_the_consumer_closes(trained_model, guarantee):
    """Closing the consumer revokes its partitions and a revoke checkpoints, but not after a
    failure: the failed batch was half done, and committing it would lose its scans."""
    import gc

    from consumer.service import DetectorService

    settings = isolated_settings(
        trained_model,
        batch_max_messages=10,
        commit_interval_s=600,
        processing_guarantee=guarantee,
    )
    epc = "001.8805843.3842332.100006.20250701.{:09d}".format
    producer = make_producer(settings)
    for i in range(40):
        producer.produce(
            settings.topic_scans, value=_scan_record(epc(i), "2025-07-10 12:00:00"), partition=0
        )
    assert producer.flush(30) == 0

    thresholds = gc.get_threshold()
    service = DetectorService(settings)
    score_batch, scored = service.inferencer.score_batch, []

    def fails_on_the_second_batch(scans, table):
        if scored:
            raise RuntimeError("scoring failed")
        scored.append(len(scans))
        return score_batch(scans, table)

    service.inferencer.score_batch = fails_on_the_second_batch
    try:
        with pytest.raises(RuntimeError, match="scoring failed"):
            service.run()
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
    reader = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": settings.group_id,
            "isolation.level": "read_committed",
        }
    )
    [committed] = reader.committed([TopicPartition(settings.topic_scans, 0)], timeout=30)
    reader.close()
    assert scored and max(committed.offset, 0) <= scored[0]


@pytest.mark.integration
@pytest.mark.slow
def test_an_idle_exit_waits_for_the_partitions_a_dead_member_still_holds(trained_model):
    settings = isolated_settings(trained_model, session_timeout_s=6)
    first = start_detector(settings)
    wait_until_consuming(first)
    second = start_detector(settings, idle_exit_s=3.0)
    wait_until_consuming(second)
    time.sleep(3)  # the group has settled: each member owns some partitions
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    _publish_keyed(settings, 400)  # every partition gets scans
    # The dead member's partitions are handed over when its session times out, and read.
    assert second.wait(120) == 0, open(second.log_path).read()[-3000:]
    assert committed_all(settings), open(second.log_path).read()[-3000:]


@pytest.mark.integration
@pytest.mark.slow
def test_two_live_detectors_with_one_instance_id_the_fenced_one_says_why(trained_model):
    settings = isolated_settings(trained_model, processing_guarantee="exactly_once")
    first = start_detector(settings, instance_id="pod-a")
    wait_until_consuming(first)
    second = start_detector(settings, instance_id="pod-a")
    wait_until_consuming(second)
    _publish_keyed(settings, 200)  # both members get scans
    try:
        assert first.wait(60) == 1
        log = open(first.log_path).read()
        assert '"detector_fenced"' in log and "EPCWATCH_INSTANCE_ID" in log, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
        assert '"partitions_revoked"' in log  # it left the group instead of timing out of it
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(60)


@pytest.mark.integration
@pytest.mark.slow
def test_group_grows_to_three_and_shrinks_to_one_with_the_same_alerts(trained_model, tmp_path):
    # No checkpoint on a timer: what a member did is made durable only when its partitions are
    # revoked (or input pauses, or it shuts down), and the next owner must carry on from that.
    settings = isolated_settings(trained_model, batch_max_messages=300, commit_interval_s=600)
    stream = simulate(2500, 23, settings, 0.06, days=5, start=STREAM_START)
    paths = write_simulation(stream, tmp_path / "stream.tsv")
    publisher = _publish_slowly(settings, paths["scans"], rate=800)
    first = start_detector(settings)
    time.sleep(4)
    second = start_detector(settings)
    time.sleep(4)
    third = start_detector(settings)
    time.sleep(4)
    for extra in (second, third):
        extra.send_signal(signal.SIGTERM)
        assert extra.wait(60) == 0
    publisher.join(120)
    _wait_committed(settings)
    first.send_signal(signal.SIGTERM)
    assert first.wait(60) == 0

    alerts = read_alerts(settings)
    check_alerts_against_labels(alerts, stream.incidents)
    _duplicates_share_ids(alerts)


@pytest.mark.integration
@pytest.mark.slow
def test_sigterm_commits_and_a_restart_without_input_raises_nothing(trained_model, tmp_path):
    settings = isolated_settings(trained_model)
    stream = simulate(600, 24, settings, 0.05, days=3, start=STREAM_START)
    paths = write_simulation(stream, tmp_path / "stream.tsv")
    publish_scans(read_scans(paths["scans"]), settings, show_progress=False)
    detector = start_detector(settings)
    _wait_committed(settings)
    detector.send_signal(signal.SIGTERM)
    assert detector.wait(60) == 0
    before = read_alerts(settings)
    assert before

    again = run_detector(settings, idle_exit_s=4.0)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(read_alerts(settings)) == len(before)


@pytest.mark.integration
@pytest.mark.slow
def test_ten_thousand_fuzzed_messages_all_reach_the_dlq_and_alerts_stay_right(
    trained_model, tmp_path
):
    settings = isolated_settings(trained_model)
    stream = simulate(1500, 25, settings, 0.06, days=4, start=STREAM_START)
    paths = write_simulation(stream, tmp_path / "stream.tsv")
    rng = random.Random(7)
    good = [r for _, r in read_scans(paths["scans"])]
    bad = [_fuzz(rng, rng.choice(good)) for _ in range(10_000)]
    producer = make_producer(settings)
    queue = [(True, r) for r in good] + [(False, b) for b in bad]
    rng.shuffle(queue)
    # Keep each EPC's good scans in file order: only their interleaving with bad ones is random.
    good_iter = iter(good)
    for is_good, item in queue:
        if is_good:
            record = next(good_iter)
            producer.produce(
                settings.topic_scans,
                key=record["epc_code"].encode(),
                value=orjson.dumps(record),
            )
        else:
            producer.produce(settings.topic_scans, key=b"fuzz", value=item)
        producer.poll(0)
    producer.flush(30)

    result = run_detector(settings, idle_exit_s=6.0)
    assert result.returncode == 0, result.stderr[-3000:]
    dead = read_all(settings, settings.topic_dlq)
    assert len(dead) == len(bad)
    assert all(dict(m.headers()).get("reason") for m in dead)
    check_alerts_against_labels(read_alerts(settings), stream.incidents)


def _fuzz(rng: random.Random, record: dict) -> bytes:
    choice = rng.randrange(6)
    if choice == 0:
        return rng.randbytes(rng.randrange(1, 200))
    if choice == 1:
        return orjson.dumps(record)[: rng.randrange(1, 40)]
    broken = dict(record)
    if choice == 2:
        broken.pop(rng.choice(["epc_code", "event_time", "business_step", "event_type"]))
    elif choice == 3:
        broken["event_time"] = rng.choice(["yesterday", "2025-13-40 99:99:99", "", "12"])
    elif choice == 4:
        broken["epc_code"] = rng.choice([None, 12, [], {"a": 1}, True])
    else:
        broken["event_type"] = rng.choice(["Teleport", "", "pos_sell"])
    return orjson.dumps(broken)


@pytest.mark.integration
def test_a_burst_into_a_tiny_producer_queue_waits_instead_of_failing():
    from producer.kafka import DeliveryTracker, produce_with_backpressure
    from tests.kafka_support import isolated_settings as fresh

    settings = fresh(__import__("pathlib").Path("unused"))
    producer = make_producer(settings, **{"queue.buffering.max.messages": 500})
    tracker = DeliveryTracker()
    for i in range(50_000):
        produce_with_backpressure(
            producer,
            settings.topic_alerts,
            key=str(i).encode(),
            value=b"x" * 64,
            on_delivery=tracker,
        )
    assert producer.flush(60) == 0
    assert tracker.delivered == 50_000 and not tracker.failed


@pytest.mark.integration
@pytest.mark.slow
def test_many_distinct_epcs_stay_within_the_state_bound_across_a_restart(trained_model):
    settings = isolated_settings(trained_model, state_max_epcs=5000)
    producer = make_producer(settings)
    n = 30_000
    for i in range(n):
        epc = f"001.8805843.3842332.100006.20250701.{i:09d}"
        record = {
            "epc_code": epc,
            "event_time": "2025-07-20 10:00:00",
            "location_id": "100",
            "business_step": "Factory",
            "event_type": "Aggregation",
        }
        producer.produce(settings.topic_scans, key=epc.encode(), value=orjson.dumps(record))
        producer.poll(0)
    producer.flush(30)
    first = run_detector(settings, idle_exit_s=5.0)
    assert first.returncode == 0, first.stderr[-3000:]
    stopped = orjson.loads(
        next(line for line in first.stderr.splitlines() if '"detector_stopped"' in line)
    )
    assert stopped["scored"] == n
    assert stopped["evicted"] >= n - 5000

    second = run_detector(settings, idle_exit_s=3.0)
    assert second.returncode == 0, second.stderr[-3000:]
    restored = [
        orjson.loads(line) for line in second.stderr.splitlines() if '"windows_restored"' in line
    ]
    assert restored and all(r["tracked_epcs"] <= 5000 for r in restored)
