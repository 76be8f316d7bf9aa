"""Where per-EPC windows live while the detector runs, how they stay bounded, and how they survive.

The windows are a `WindowTable` (columns, one slot per EPC) with what a service needs on top:
the position (partition, offset) of the last scan applied to each window, the order of updates,
and two bounds. A window whose EPC has not been scanned for `state_ttl_s` of event time expires,
and past `state_max_epcs` the least recently updated windows are evicted; both are counted, so
operators see when history is being dropped.

Every changed window is written to a compacted changelog topic keyed by EPC, in the partition of
the scan that changed it (the changelog is co-partitioned with the scan topic), and a dropped
window is written as a tombstone. A detector that is assigned a partition reads that changelog
partition to its end before it scores any scan of the partition. Each changelog record carries
the offset of the last scan applied, so a scan replayed after a crash is recognised and not
applied twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import numpy as np
import orjson
import structlog
from confluent_kafka import Consumer, KafkaError, TopicPartition

from detector.windows import EVENT_ID_BYTES, LONG_ID_MARK, WindowTable, field_bytes
from producer.kafka import end_offsets

log = structlog.get_logger(__name__)

CHANGELOG_FORMAT = 3
# Restored records are applied in chunks, so a restore holds at most this many values at once.
RESTORE_CHUNK = 50_000
# While a restore waits on an open transaction, it says so this often (seconds).
RESTORE_WAIT_LOG_S = 5.0


class WindowStore(WindowTable):
    """Windows with positions, update order, expiry by event time and a cap with eviction."""

    def __init__(
        self,
        window_scans: int,
        hidden_size: int,
        registered: frozenset[str],
        max_epcs: int,
        ttl_s: float,
        capacity: int = 1024,
    ) -> None:
        super().__init__(window_scans, hidden_size, registered, capacity)
        self.add_column("partition", (), np.int32, -1)
        self.add_column("offset", (), np.int64, -1)
        self.add_column("touched", (), np.int64, 0)
        self.max_epcs = max_epcs
        self.ttl_s = ttl_s
        self.evicted = 0
        self.expired = 0
        self.watermark = float("-inf")  # the latest event time applied to any window
        self.updates = 0  # scans applied so far: the order of updates
        self.dropped: dict[str, int] = {}  # EPC → partition, for tombstones
        self._changed: list[np.ndarray] = []
        self._sites_seen: object = None
        self._site_bytes = np.zeros(0, dtype=f"S{EVENT_ID_BYTES}")
        self._site_long = np.zeros(0, dtype=bool)
        self._long_sites: dict[bytes, str] = {}

    partition: np.ndarray
    offset: np.ndarray
    touched: np.ndarray

    def open(self, epc: str, t: float) -> int:
        slot = super().open(epc, t)
        self.partition[slot] = -1
        self.offset[slot] = -1
        return slot

    def applied(self, epc: str, partition: int, offset: int) -> bool:
        """Whether the scan at (partition, offset) is already in this EPC's window."""
        slot = self.slot_of.get(epc)
        return (
            slot is not None
            and int(self.partition[slot]) == partition
            and offset <= int(self.offset[slot])
        )

    def mark(self, slots: np.ndarray, partitions: np.ndarray, offsets: np.ndarray) -> None:
        """Record the position of the scans just applied to `slots` (in arrival order)."""
        if not len(slots):
            return
        _, first_from_end = np.unique(slots[::-1], return_index=True)
        last = len(slots) - 1 - first_from_end  # an EPC's last scan in the batch
        chosen = slots[last]
        self.partition[chosen] = partitions[last]
        self.offset[chosen] = offsets[last]
        self.touched[chosen] = self.updates + last
        self.updates += len(slots)
        self.watermark = max(self.watermark, float(self.last_t[chosen].max()))
        self._changed.append(chosen)

    def bound(self) -> int:
        """Evict the least recently updated windows past `max_epcs`; returns how many."""
        excess = len(self) - self.max_epcs
        if excess <= 0:
            return 0
        live = self.live_slots()
        oldest = live[np.argpartition(self.touched[live], excess - 1)[:excess]]
        self._drop(oldest)
        self.evicted += excess
        return excess

    def expire(self) -> int:
        """Drop windows idle for longer than the TTL in event time; returns how many."""
        live = self.live_slots()
        idle = live[self.last_t[live] < self.watermark - self.ttl_s]
        self._drop(idle)
        self.expired += len(idle)
        return len(idle)

    def _drop(self, slots: np.ndarray) -> None:
        for slot in slots.tolist():
            epc = self.epc_at[slot]
            if epc is not None and self.partition[slot] >= 0:
                self.dropped[epc] = int(self.partition[slot])
        self.close(slots.tolist())

    def drop_partitions(self, partitions: set[int]) -> int:
        """Forget the windows of partitions this process no longer owns (no tombstones: they
        are another owner's now)."""
        gone = self._slots_of(partitions)
        for slot in gone.tolist():
            self.dropped.pop(self.epc_at[slot] or "", None)
        self.close(gone.tolist())
        return len(gone)

    def take_changes(self) -> list[tuple[str, int, bytes | None]]:
        """Changelog records for this batch: (EPC, partition, value); None is a tombstone."""
        records: list[tuple[str, int, bytes | None]] = []
        if self._changed:
            slots = np.unique(np.concatenate(self._changed))
            self._changed.clear()
            epcs = [self.epc_at[s] for s in slots.tolist()]
            live = np.array([e is not None for e in epcs], dtype=bool)
            slots = slots[live & (self.partition[slots] >= 0)]
            values = self.encode(slots)
            partitions = self.partition[slots].tolist()
            records = [
                (self.epc_at[s], p, v)  # type: ignore[misc]
                for s, p, v in zip(slots.tolist(), partitions, values, strict=True)
            ]
        records.extend((epc, partition, None) for epc, partition in self.dropped.items())
        self.dropped.clear()
        return records

    def encode(self, slots: np.ndarray) -> list[bytes]:
        """Changelog values of `slots`: one fixed binary record each (see `record_dtype`),
        followed by a JSON object naming the long site names and event ids it holds as tokens,
        only when it holds any."""
        dtype = record_dtype(self.size, self.hidden_size)
        records = np.zeros(len(slots), dtype)
        records["format"] = CHANGELOG_FORMAT
        records["window"] = self.size
        records["hidden_size"] = self.hidden_size
        for name in ("count", "offset", "first_t", "last_t", "hidden"):
            records[name] = getattr(self, name)[slots]
        for name in ("t", "tier", "etype", "side", "eid"):
            records[name] = getattr(self, name)[slots]
        loc, eid = self.loc[slots], self.eid[slots]
        site_bytes, site_long = self._site_tokens()
        records["loc"] = site_bytes[loc]
        blob, size = records.tobytes(), dtype.itemsize
        values = [blob[i * size : (i + 1) * size] for i in range(len(slots))]
        held = np.arange(self.size) >= (self.size - records["count"].astype(np.int64))[:, None]
        long_ids = eid.view(np.uint8).reshape(*eid.shape, EVENT_ID_BYTES)[..., 0] == 0xFF
        with_tokens = ((long_ids | site_long[loc]) & held).any(axis=1)
        for i in np.flatnonzero(with_tokens).tolist():
            values[i] += self._names_of_tokens(records[i], held[i])
        return values

    def _site_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """Each site id's name as record bytes (a long name becomes a token), and which are
        tokens; kept in step with the site table."""
        if self._sites_seen is not self.sites:
            self._sites_seen = self.sites
            self._site_bytes = np.zeros(0, dtype=f"S{EVENT_ID_BYTES}")
            self._site_long = np.zeros(0, dtype=bool)
        names = self.sites.names
        if len(self._site_bytes) < len(names):
            extra, long = [], []
            for name in names[len(self._site_bytes) :]:
                raw = field_bytes(name)
                long.append(raw[:1] == LONG_ID_MARK)
                if long[-1]:
                    self._long_sites[raw] = name
                extra.append(raw)
            self._site_bytes = np.append(self._site_bytes, np.array(extra, f"S{EVENT_ID_BYTES}"))
            self._site_long = np.append(self._site_long, np.array(long, dtype=bool))
        return self._site_bytes, self._site_long

    def _names_of_tokens(self, record: np.void, held: np.ndarray) -> bytes:
        sites = {
            raw.hex(): self._long_sites[raw]
            for raw in record["loc"][held].tolist()
            if raw[:1] == LONG_ID_MARK and raw in self._long_sites
        }
        ids = {
            raw.hex(): self.long_ids[raw]
            for raw in record["eid"][held].tolist()
            if raw[:1] == LONG_ID_MARK and raw in self.long_ids
        }
        return orjson.dumps({"sites": sites, "ids": ids})

    def restore(self, records: Iterable[tuple[str, int, bytes | None]]) -> int:
        """Apply changelog records (EPC, partition, value) in order; returns windows restored.

        Restored windows are in the changelog already, so they are not written again; changes
        still pending for the windows held before (other partitions, since the last
        checkpoint) stay pending. Windows the cap evicts now are tombstoned like any others.
        """
        pending = np.unique(np.concatenate(self._changed)) if self._changed else np.zeros(0, int)
        pending = pending[[self.epc_at[slot] is not None for slot in pending.tolist()]]
        self._changed = []  # (a slot freed before is not: the restore may reuse it)
        restored = 0
        for chunk in _chunks(records, RESTORE_CHUNK):
            latest: dict[str, tuple[int, bytes | None]] = {}
            for epc, partition, value in chunk:
                latest[epc] = (partition, value)
            gone = [self.slot_of[e] for e, (_, v) in latest.items() if v is None and e in self]
            self.close(gone)
            restored += self._apply([(e, p, v) for e, (p, v) in latest.items() if v is not None])
        self._changed = [pending]
        self.bound()  # the cap holds for restored windows too
        return restored

    def _apply(self, records: list[tuple[str, int, bytes]], together: bool = True) -> int:
        """Load records into windows; returns how many were applied. Records of this store's
        window and LSTM sizes holding only plain (ASCII) sites and event ids are loaded
        together, as arrays (`together`); any other record one at a time (`_load`)."""
        if together:
            rest = self._apply_together(records)
            applied = len(records) - len(rest)
            records = rest
        else:
            applied = 0
        for epc, partition, value in records:
            try:
                record, names = decode_record(value)
            except ValueError as exc:
                log.warning("changelog_record_unreadable", epc=epc, error=str(exc))
                continue
            slot = self.slot_of.get(epc)
            if slot is None:
                slot = self.open(epc, float(record["first_t"]))
            self._load(slot, record, names)
            self.partition[slot] = partition
            self.touched[slot] = self.updates
            self.updates += 1
            applied += 1
        if applied:
            live = self.live_slots()
            self.watermark = max(self.watermark, float(self.last_t[live].max()))
        return applied

    def _apply_together(
        self, records: list[tuple[str, int, bytes]]
    ) -> list[tuple[str, int, bytes]]:
        """`_load` for every record it can take as one array; returns the others."""
        dtype = record_dtype(self.size, self.hidden_size)
        hidden = self.hidden_size.to_bytes(2, "little")
        plain = [
            i
            for i, (_, _, v) in enumerate(records)
            if len(v) == dtype.itemsize
            and v[0] == CHANGELOG_FORMAT
            and v[2] == self.size
            and v[3:5] == hidden
        ]
        if not plain:
            return records
        block = np.frombuffer(b"".join(records[i][2] for i in plain), dtype)
        n, w = len(block), self.size
        ascii_ok = np.ones(n, dtype=bool)
        for name in ("loc", "eid"):
            cells = np.ascontiguousarray(block[name]).view(np.uint8).reshape(n, -1)
            ascii_ok &= cells.max(axis=1) < 0x80
        if not ascii_ok.all():
            block = block[ascii_ok]
            plain = [i for i, ok in zip(plain, ascii_ok.tolist(), strict=True) if ok]
            n = len(block)
        epcs = [records[i][0] for i in plain]
        slots = np.array([self.slot_of.get(e, -1) for e in epcs], dtype=np.int64)
        new = np.flatnonzero(slots < 0)
        if len(new):
            slots[new] = self.open_many([epcs[j] for j in new.tolist()], block["first_t"][new])
        kept = np.minimum(block["count"].astype(np.int64), w)
        self.count[slots] = kept
        self.offset[slots] = block["offset"]
        self.first_t[slots], self.last_t[slots] = block["first_t"], block["last_t"]
        self.hidden[slots] = block["hidden"]
        for name in ("t", "tier", "etype", "side", "eid"):
            getattr(self, name)[slots] = block[name]
        held = np.arange(w) >= (w - kept)[:, None]
        names, codes = np.unique(block["loc"][held], return_inverse=True)
        ids = np.array([self.sites.id(raw.decode()) for raw in names.tolist()], dtype=np.int64)
        loc = np.zeros((n, w), dtype=self.loc.dtype)
        loc[held] = ids[codes.ravel()]
        self.loc[slots] = loc
        self.partition[slots] = [records[i][1] for i in plain]
        self.touched[slots] = self.updates + np.arange(n)
        self.updates += n
        taken = set(plain)
        return [r for i, r in enumerate(records) if i not in taken]

    def _load(self, slot: int, record: np.void, names: dict[str, dict[str, str]]) -> None:
        """One decoded record into a slot; a different window length keeps the newest scans,
        a different LSTM size starts the state afresh."""
        width = int(record["window"])
        kept = min(int(record["count"]), width, self.size)
        self.count[slot] = kept
        self.offset[slot] = record["offset"]
        self.first_t[slot] = record["first_t"]
        self.last_t[slot] = record["last_t"]
        same_model = int(record["hidden_size"]) == self.hidden_size
        self.hidden[slot] = record["hidden"] if same_model else 0.0
        if not kept:
            return
        source, target = slice(width - kept, width), slice(self.size - kept, self.size)
        for name in ("t", "tier", "etype", "side"):
            getattr(self, name)[slot, target] = record[name][source]
        sites, ids = names.get("sites", {}), names.get("ids", {})
        self.loc[slot, target] = [
            self.sites.id(sites.get(raw.hex(), "") or raw.decode(errors="replace"))
            for raw in record["loc"][source].tolist()
        ]
        eids = [
            ids.get(raw.hex()) or raw.decode(errors="replace")
            for raw in record["eid"][source].tolist()
        ]
        self.eid[slot, target] = self.event_id_bytes(eids)

    def _slots_of(self, partitions: Iterable[int]) -> np.ndarray:
        """The live slots whose windows belong to `partitions`."""
        live = self.live_slots()
        return live[np.isin(self.partition[live], list(partitions))]

    def partition_watermark(self, partition: int) -> float:
        """The latest event time of the windows of a partition (-inf without any)."""
        mine = self._slots_of([partition])
        return float(self.last_t[mine].max()) if len(mine) else float("-inf")

    def replay_horizon(self, partition: int) -> int:
        """The highest offset applied to a window of a partition: scans up to it may be
        replays (-1 without any)."""
        mine = self._slots_of([partition])
        return int(self.offset[mine].max()) if len(mine) else -1


def record_dtype(window_scans: int, hidden_size: int) -> np.dtype:
    """The fixed part of a changelog value (format 3): header, LSTM state, then the window's
    scans oldest first, the last `count` of `window` columns in use; sites and event ids as
    bytes (a long one as a token named in the JSON that follows the record)."""
    w = window_scans
    return np.dtype(
        [
            ("format", "u1"),
            ("count", "u1"),
            ("window", "u1"),
            ("hidden_size", "<u2"),
            ("offset", "<i8"),
            ("first_t", "<f8"),
            ("last_t", "<f8"),
            ("hidden", "<f4", (2 * hidden_size,)),
            ("t", "<f8", (w,)),
            ("tier", "i1", (w,)),
            ("etype", "i1", (w,)),
            ("side", "?", (w,)),
            ("loc", f"S{EVENT_ID_BYTES}", (w,)),
            ("eid", f"S{EVENT_ID_BYTES}", (w,)),
        ]
    )


_HEADER = np.dtype([("format", "u1"), ("count", "u1"), ("window", "u1"), ("hidden_size", "<u2")])


def decode_record(value: bytes) -> tuple[np.void, dict[str, dict[str, str]]]:
    """A changelog value back into its record and the names of its tokens."""
    if len(value) < _HEADER.itemsize or value[0] != CHANGELOG_FORMAT:
        raise ValueError(f"not a format {CHANGELOG_FORMAT} window record")
    header = np.frombuffer(value[: _HEADER.itemsize], _HEADER)[0]
    dtype = record_dtype(int(header["window"]), int(header["hidden_size"]))
    if len(value) < dtype.itemsize:
        raise ValueError(f"window record of {len(value)} bytes, expected {dtype.itemsize}")
    record = np.frombuffer(value[: dtype.itemsize], dtype)[0]
    names = orjson.loads(value[dtype.itemsize :]) if len(value) > dtype.itemsize else {}
    return record, names


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def read_changelog(
    bootstrap_servers: str, topic: str, partitions: Iterable[int]
) -> Iterator[tuple[str, int, bytes | None]]:
    """The changelog records of `partitions`, each read to its end as of now.

    The end is the high watermark when the read starts. A `read_committed` reader stops short of
    it (at the last stable offset) while a transaction is open, and the records other producers
    committed after that transaction began would be missing from the restored windows: a
    detector killed mid-batch in exactly-once mode leaves one open until its successor fences it
    or the broker times it out. So the read waits for that, rather than restoring stale windows.
    """
    reader = Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": "epcwatch-state-restore",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    try:
        ends = end_offsets(bootstrap_servers, topic, partitions)
        ends = {p: end for p, end in ends.items() if end > 0}
        if not ends:
            return
        reader.assign([TopicPartition(topic, p, 0) for p in ends])
        remaining = set(ends)
        waiting_since = time.monotonic()
        while remaining:
            for message in reader.consume(10000, 1.0):
                p = message.partition()
                if message.error():
                    # End of what is readable: the end, or the start of an open transaction.
                    if message.error().code() == KafkaError._PARTITION_EOF and (
                        message.offset() >= ends[p]
                    ):
                        remaining.discard(p)
                    continue
                yield message.key().decode(), p, message.value()
                if message.offset() + 1 >= ends[p]:
                    remaining.discard(p)
            if remaining and time.monotonic() - waiting_since >= RESTORE_WAIT_LOG_S:
                waiting_since = time.monotonic()
                log.warning(
                    "restore_waiting",
                    topic=topic,
                    partitions=sorted(remaining),
                    reason="not read to its end yet; an open transaction holds it back until "
                    "it is committed, aborted or timed out",
                )
    finally:
        reader.close()


def restore_partitions(
    store: WindowStore, bootstrap_servers: str, topic: str, partitions: Iterable[int]
) -> int:
    """Load the changelog of `partitions` into `store`, reading each to its current end."""
    return store.restore(read_changelog(bootstrap_servers, topic, partitions))
