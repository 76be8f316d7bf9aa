"""Where per-EPC windows live while the detector runs, and how they stay bounded.

Windows are kept in least-recently-updated order. Two bounds hold: a window whose EPC has not
been scanned for `state_ttl_s` of event time expires, and past `state_max_epcs` the least recently
updated window is evicted. Both are counted, so operators see when history is being dropped.
"""

from __future__ import annotations

from collections import OrderedDict

from detector.features import EpcWindow


class WindowStore(OrderedDict[str, EpcWindow]):
    """A mapping EPC → window with expiry by event time and a cap with eviction."""

    def __init__(self, max_epcs: int, ttl_s: float) -> None:
        super().__init__()
        self.max_epcs = max_epcs
        self.ttl_s = ttl_s
        self.evicted = 0
        self.expired = 0
        self.watermark = float("-inf")  # the latest event time applied to any window

    def __setitem__(self, epc: str, window: EpcWindow) -> None:
        super().__setitem__(epc, window)
        self.move_to_end(epc)
        if window.last_t > self.watermark:
            self.watermark = window.last_t
        while len(self) > self.max_epcs:
            self.popitem(last=False)
            self.evicted += 1

    def expire(self) -> int:
        """Drop windows idle for longer than the TTL in event time; returns how many.

        Order is by last update, which tracks event time closely but not exactly, so the scan
        stops at the first window still young enough.
        """
        horizon = self.watermark - self.ttl_s
        dropped = 0
        while self:
            epc, window = next(iter(self.items()))
            if window.last_t >= horizon:
                break
            self.popitem(last=False)
            dropped += 1
        self.expired += dropped
        return dropped
