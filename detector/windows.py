"""Per-EPC windows as columns: the last scans of every tracked EPC in fixed-width numpy arrays.

A window is a slot, one row of each array. Millions of EPCs are tracked at once, so nothing per
EPC is a Python object except the EPC string that maps to its slot; a round of scans (at most
one per EPC) reads and updates its windows with a few array operations instead of a loop.

Scans in a window are kept oldest first, the newest in the last column; `count` says how many
of the last columns hold scans. Sites are small integers (`SiteTable`), event ids fixed-width
bytes. Arrays grow by doubling; freshly allocated rows are untouched zero pages, so memory
follows the slots in use rather than the capacity.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from detector.epc import STRUCTURE_DEFECTS, inspect_epc, inspect_epcs

EVENT_ID_BYTES = 16
# Event ids longer than `EVENT_ID_BYTES` are kept as a token (this byte, then a hash) and the
# full id beside it, for as long as a window holds the token.
LONG_ID_MARK = b"\xff"
STRUCTURE_BITS = {name: 1 << i for i, name in enumerate(STRUCTURE_DEFECTS)}
# Site ids are renumbered (only the sites windows still hold are kept) past this many.
SITES_MAX = 1_000_000


def field_bytes(text: str) -> bytes:
    """`text` as a fixed-width field of `EVENT_ID_BYTES`: itself when it fits, else a token.

    >>> field_bytes("61106b15123433e0"), len(field_bytes("a-much-longer-event-identifier"))
    (b'61106b15123433e0', 16)
    """
    raw = text.encode()
    if len(raw) <= EVENT_ID_BYTES and raw[:1] != LONG_ID_MARK and raw[-1:] != b"\0":
        return raw
    digest = hashlib.blake2b(raw, digest_size=EVENT_ID_BYTES - 1).digest()
    # numpy's fixed-width bytes drop trailing NULs when read back: a token must not end in one,
    # or it would no longer match the name it stands for (one digest in 256 does).
    if digest[-1:] == b"\0":
        digest = digest[:-1] + b"\x80"
    return LONG_ID_MARK + digest


class SiteTable:
    """Site ids as small integers, so windows hold and compare ints; names come back by id.

    >>> sites = SiteTable()
    >>> sites.id("101"), sites.id("205"), sites.id("101"), sites.names[1]
    (0, 1, 0, '205')
    """

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        for name in names:
            self.id(name)

    def id(self, name: str) -> int:
        found = self.index.get(name)
        if found is None:
            found = self.index[name] = len(self.names)
            self.names.append(name)
        return found

    def __len__(self) -> int:
        return len(self.names)


class WindowTable:
    """EPC → slot, and per slot its last `window_scans` scans, its code's facts, LSTM state.

    Per slot: `count`, `first_t`/`last_t` (event time), `defects` (structural defects of the
    code as bits of `STRUCTURE_BITS`), `made_at` (manufacture day, NaN if none), `hidden` (the
    LSTM's h then c). Per slot and scan: `t`, `loc` (site id), `tier`, `etype`, `side` (a clone
    read, never a predecessor) and `eid` (event id bytes). A table without `event_ids` keeps
    one empty byte for each: a caller that finds a clone's partner itself (scoring a whole file)
    does not pay for moving ids around.
    """

    def __init__(
        self,
        window_scans: int,
        hidden_size: int,
        registered: frozenset[str],
        capacity: int = 1024,
        event_ids: bool = True,
    ) -> None:
        self.size = window_scans
        self.hidden_size = hidden_size
        self.registered = registered
        self.sites = SiteTable()
        self.slot_of: dict[str, int] = {}
        self.epc_at: list[str | None] = []
        self.free: list[int] = []
        self.long_ids: dict[bytes, str] = {}
        self._long_ids_pruned_at = 0
        self.capacity = 0
        w, h = window_scans, 2 * hidden_size
        self._layout: dict[str, tuple[tuple[int, ...], Any, Any]] = {
            "count": ((), np.uint8, 0),
            "first_t": ((), np.float64, 0.0),
            "last_t": ((), np.float64, 0.0),
            "defects": ((), np.uint8, 0),
            "made_at": ((), np.float64, np.nan),
            "hidden": ((h,), np.float32, 0.0),
            "t": ((w,), np.float64, 0.0),
            "loc": ((w,), np.int32, 0),
            "tier": ((w,), np.int8, 0),
            "etype": ((w,), np.int8, 0),
            "side": ((w,), np.bool_, False),
            "eid": ((w,), f"S{EVENT_ID_BYTES if event_ids else 1}", b""),
        }
        self._grow(capacity)

    # Arrays are attributes named as in `_layout`; declared here for readers and type checkers.
    count: np.ndarray
    first_t: np.ndarray
    last_t: np.ndarray
    defects: np.ndarray
    made_at: np.ndarray
    hidden: np.ndarray
    t: np.ndarray
    loc: np.ndarray
    tier: np.ndarray
    etype: np.ndarray
    side: np.ndarray
    eid: np.ndarray

    def add_column(self, name: str, shape: tuple[int, ...], dtype: Any, fill: Any) -> None:
        """Another per-slot array, grown with the others (a store's positions, say)."""
        self._layout[name] = (shape, dtype, fill)
        array = np.zeros((self.capacity, *shape), dtype)
        if fill:
            array[:] = fill
        setattr(self, name, array)

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        for name, (shape, dtype, fill) in self._layout.items():
            array = np.zeros((capacity, *shape), dtype)
            if fill:
                array[old:] = fill
            if old:
                array[:old] = getattr(self, name)
            setattr(self, name, array)
        self.epc_at.extend([None] * (capacity - old))
        self.free.extend(range(capacity - 1, old - 1, -1))  # lowest slot is popped first
        self.capacity = capacity

    def __len__(self) -> int:
        return len(self.slot_of)

    def slot_bytes(self) -> int:
        """Bytes one slot takes in the arrays."""
        return sum(getattr(self, name)[0].nbytes for name in self._layout)

    def __contains__(self, epc: object) -> bool:
        return epc in self.slot_of

    def live_slots(self) -> np.ndarray:
        return np.fromiter(self.slot_of.values(), dtype=np.int64, count=len(self.slot_of))

    def open(self, epc: str, t: float) -> int:
        """A fresh window for `epc`, first scanned at `t`; returns its slot."""
        if not self.free:
            self._grow(max(1024, 2 * self.capacity))
        slot = self.free.pop()
        self.slot_of[epc] = slot
        self.epc_at[slot] = epc
        facts = inspect_epc(epc, self.registered)
        self.defects[slot] = sum(STRUCTURE_BITS[d] for d in facts.defects)
        self.made_at[slot] = np.nan if facts.made_at is None else facts.made_at
        self.first_t[slot] = self.last_t[slot] = t
        self.count[slot] = 0
        self.hidden[slot] = 0.0
        return slot

    def open_many(self, epcs: Sequence[str], t: np.ndarray) -> np.ndarray:
        """`open` for each of `epcs` (none of them tracked yet) at times `t`; returns slots."""
        if len(self.free) < len(epcs):
            self._grow(max(1024, 2 * self.capacity, self.capacity + len(epcs)))
        slots = np.array(self.free[len(self.free) - len(epcs) :][::-1], dtype=np.int64)
        del self.free[len(self.free) - len(epcs) :]
        self.slot_of.update(zip(epcs, slots.tolist(), strict=True))
        for epc, slot in zip(epcs, slots.tolist(), strict=True):
            self.epc_at[slot] = epc
        found, made_at = inspect_epcs(epcs, self.registered)
        defects = (found * np.array(list(STRUCTURE_BITS.values()), dtype=np.uint8)).sum(axis=1)
        self.defects[slots], self.made_at[slots] = defects.astype(np.uint8), made_at
        self.first_t[slots] = self.last_t[slots] = t
        self.count[slots] = 0
        self.hidden[slots] = 0.0
        return slots

    def reset_hidden(self, hidden_size: int) -> None:
        """Start every window's LSTM state afresh, for a model with `hidden_size` units."""
        self.hidden_size = hidden_size
        self._layout["hidden"] = ((2 * hidden_size,), np.float32, 0.0)
        self.hidden = np.zeros((self.capacity, 2 * hidden_size), np.float32)

    def close(self, slots: Iterable[int]) -> None:
        """Forget the windows in `slots`."""
        for slot in slots:
            epc = self.epc_at[slot]
            if epc is not None:
                del self.slot_of[epc]
                self.epc_at[slot] = None
                self.free.append(slot)

    def append(
        self,
        slots: np.ndarray,
        t: np.ndarray,
        loc: np.ndarray,
        tier: np.ndarray,
        etype: np.ndarray,
        eid: np.ndarray,
        side: np.ndarray,
    ) -> None:
        """Append one scan to each window of `slots` (no slot twice), dropping the oldest."""
        for array, values in (
            (self.t, t),
            (self.loc, loc),
            (self.tier, tier),
            (self.etype, etype),
            (self.eid, eid),
            (self.side, side),
        ):
            array[slots, :-1] = array[slots, 1:]
            array[slots, -1] = values
        self.count[slots] = np.minimum(self.count[slots] + 1, self.size)
        self.last_t[slots] = np.maximum(self.last_t[slots], t)

    def event_id_bytes(self, event_ids: Sequence[str]) -> np.ndarray:
        """Event ids as the window stores them; long ones become tokens kept in `long_ids`."""
        encoded = [field_bytes(e) for e in event_ids]
        for raw, event_id in zip(encoded, event_ids, strict=True):
            if raw[:1] == LONG_ID_MARK:
                self.long_ids[raw] = event_id
        if len(self.long_ids) > max(100_000, 2 * self._long_ids_pruned_at):
            self._prune_long_ids()
        return np.array(encoded, dtype=f"S{EVENT_ID_BYTES}")

    def event_id(self, raw: bytes) -> str:
        if raw[:1] == LONG_ID_MARK:
            return self.long_ids.get(raw, raw.hex())
        return raw.decode(errors="replace")

    def _prune_long_ids(self) -> None:
        held = set(self.eid[self.live_slots()].ravel().tolist())
        self.long_ids = {k: v for k, v in self.long_ids.items() if k in held}
        self._long_ids_pruned_at = len(self.long_ids)

    def compact_sites(self) -> bool:
        """Renumber sites to those windows still hold, once there are more than `SITES_MAX`.

        A stream of made-up site ids cannot grow the site table without bound. Returns whether
        ids changed (anything keyed by site id must then be rebuilt).
        """
        if len(self.sites) <= SITES_MAX:
            return False
        slots = self.live_slots()
        held = self.loc[slots]
        columns = np.arange(self.size) >= (self.size - self.count[slots].astype(np.int64))[:, None]
        used = np.unique(held[columns])
        remap = np.zeros(len(self.sites), dtype=np.int32)
        remap[used] = np.arange(len(used), dtype=np.int32)
        self.loc[slots] = np.where(columns, remap[held], 0)
        self.sites = SiteTable(self.sites.names[i] for i in used.tolist())
        return True
