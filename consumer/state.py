"""Where per-EPC windows live while the detector runs, how they stay bounded, and how they survive.

Windows are kept in least-recently-updated order. Two bounds hold: a window whose EPC has not
been scanned for `state_ttl_s` of event time expires, and past `state_max_epcs` the least recently
updated window is evicted. Both are counted, so operators see when history is being dropped.

Every changed window is written to a compacted changelog topic keyed by EPC, in the partition of
the scan that changed it (the changelog is co-partitioned with the scan topic), and a dropped
window is written as a tombstone. A detector that is assigned a partition reads that changelog
partition to its end before it scores any scan of the partition. Each changelog record carries
the offset of the last scan applied, so a scan replayed after a crash is recognised and not
applied twice.
"""

from __future__ import annotations

import base64
import sys
from collections import OrderedDict
from collections.abc import Iterable

import orjson
import structlog
from confluent_kafka import Consumer, KafkaError, TopicPartition

from detector.epc import inspect_epc
from detector.features import EpcWindow, WindowScan

log = structlog.get_logger(__name__)


class WindowStore(OrderedDict[str, EpcWindow]):
    """A mapping EPC → window with expiry by event time, a cap with eviction, and positions.

    Each window records the (partition, offset) of the last scan applied to it: which partition
    owns the EPC, and which replayed scans to skip.
    """

    def __init__(self, max_epcs: int, ttl_s: float) -> None:
        super().__init__()
        self.max_epcs = max_epcs
        self.ttl_s = ttl_s
        self.evicted = 0
        self.expired = 0
        self.watermark = float("-inf")  # the latest event time applied to any window
        self.changed: set[str] = set()
        self.dropped: dict[str, int] = {}  # EPC → partition, for tombstones

    def __setitem__(self, epc: str, window: EpcWindow) -> None:
        super().__setitem__(epc, window)
        self.move_to_end(epc)
        self.changed.add(epc)
        if window.last_t > self.watermark:
            self.watermark = window.last_t
        while len(self) > self.max_epcs:
            self._drop_oldest()
            self.evicted += 1

    def _drop_oldest(self) -> None:
        epc, window = self.popitem(last=False)
        self.changed.discard(epc)
        if window.partition >= 0:
            self.dropped[epc] = window.partition

    def applied(self, epc: str, partition: int, offset: int) -> bool:
        """Whether the scan at (partition, offset) is already in this EPC's window."""
        window = self.get(epc)
        return window is not None and window.partition == partition and offset <= window.offset

    def mark(self, epc: str, partition: int, offset: int) -> None:
        window = self[epc]
        window.partition = partition
        window.offset = offset

    def expire(self) -> int:
        """Drop windows idle for longer than the TTL in event time; returns how many.

        Order is by last update, which tracks event time closely but not exactly, so the scan
        stops at the first window still young enough.
        """
        horizon = self.watermark - self.ttl_s
        dropped = 0
        while self:
            window = next(iter(self.values()))
            if window.last_t >= horizon:
                break
            self._drop_oldest()
            dropped += 1
        self.expired += dropped
        return dropped

    def drop_partitions(self, partitions: set[int]) -> int:
        """Forget the windows of partitions this process no longer owns."""
        gone = [epc for epc, window in self.items() if window.partition in partitions]
        for epc in gone:
            del self[epc]
            self.changed.discard(epc)
            self.dropped.pop(epc, None)
        return len(gone)

    def take_changes(self) -> list[tuple[str, int, bytes | None]]:
        """Changelog records for this batch: (EPC, partition, value); None is a tombstone."""
        records: list[tuple[str, int, bytes | None]] = []
        for epc in self.changed:
            window = self.get(epc)
            if window is not None and window.partition >= 0:
                records.append((epc, window.partition, encode_window(window, window.offset)))
        records.extend((epc, partition, None) for epc, partition in self.dropped.items())
        self.changed.clear()
        self.dropped.clear()
        return records


def encode_window(window: EpcWindow, offset: int) -> bytes:
    """A window as a changelog value: a format byte, the LSTM state, then compact JSON.

    Format 2 is `b"\\x02"`, the number of float32 values in the LSTM state (2 bytes, little
    endian), the state's raw bytes, and the JSON array `[offset, first_t, last_t, scans]`.
    Format 1 (one JSON object, the state in base64) is still read.
    """
    state = window.hidden or b""
    body = orjson.dumps(
        [
            offset,
            window.first_t,
            window.last_t,
            [[s.t, s.location, s.tier, s.etype, s.event_id, s.side] for s in window.scans],
        ]
    )
    return b"\x02" + (len(state) // 4).to_bytes(2, "little") + state + body


def decode_window(
    epc: str, value: bytes, registered: frozenset[str], size: int, hidden_size: int
) -> tuple[EpcWindow, int]:
    """A changelog value back into a window and the offset of its last applied scan."""
    hidden: bytes | None = None
    if value[:1] == b"\x02":
        state_end = 3 + 4 * int.from_bytes(value[1:3], "little")
        hidden = value[3:state_end]
        offset, first_t, last_t, scans = orjson.loads(value[state_end:])
    else:  # format 1
        data = orjson.loads(value)
        offset, first_t, last_t, scans = data["o"], data["f"], data["l"], data["s"]
        hidden = base64.b64decode(data["h"]) if data.get("h") else None
    window = EpcWindow(inspect_epc(epc, registered), float(first_t))
    window.last_t = float(last_t)
    window.scans = tuple(
        WindowScan(float(t), sys.intern(str(loc)), int(tier), int(et), str(eid), bool(side))
        for t, loc, tier, et, eid, side in scans[-size:]
    )
    if hidden and len(hidden) == 2 * 4 * hidden_size:  # float32 h and c
        window.hidden = hidden
    return window, int(offset)


def restore_partitions(
    store: WindowStore,
    bootstrap_servers: str,
    topic: str,
    partitions: Iterable[int],
    registered: frozenset[str],
    window_size: int,
    hidden_size: int,
) -> int:
    """Load the changelog of `partitions` into `store`, reading each to its current end."""
    reader = Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": "epcwatch-state-restore",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    restored = 0
    try:
        ends = {}
        for p in partitions:
            low, high = reader.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
        if not ends:
            return 0
        reader.assign([TopicPartition(topic, p, 0) for p in ends])
        remaining = set(ends)
        while remaining:
            for message in reader.consume(10000, 1.0):
                p = message.partition()
                if message.error():
                    if message.error().code() == KafkaError._PARTITION_EOF:
                        remaining.discard(p)
                    continue
                epc = message.key().decode()
                if message.value() is None:
                    store.pop(epc, None)
                else:
                    window, offset = decode_window(
                        epc, message.value(), registered, window_size, hidden_size
                    )
                    OrderedDict.__setitem__(store, epc, window)
                    store.move_to_end(epc)
                    window.partition, window.offset = p, offset
                    store.watermark = max(store.watermark, window.last_t)
                    restored += 1
                if message.offset() + 1 >= ends[p]:
                    remaining.discard(p)
    finally:
        reader.close()
    store.changed.clear()
    while len(store) > store.max_epcs:
        store._drop_oldest()  # the cap holds for restored windows too
        store.evicted += 1
    return restored
