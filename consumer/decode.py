"""From message bytes to a `Scan`, or to the reason it goes to the dead-letter topic."""

from __future__ import annotations

import orjson

from detector.schema import InvalidScan, Scan, to_scan


def decode_scan(value: bytes | None, max_bytes: int, zone: str) -> Scan | str:
    """The scan in a message value, or a reason string for the DLQ.

    >>> decode_scan(b"\\xff\\xfe", 1000, "UTC").startswith("not JSON")
    True
    >>> decode_scan(b'{"epc_code": "x"}', 1000, "UTC")
    'missing required field event_time'
    """
    if value is None:
        return "empty message"
    if len(value) > max_bytes:
        return f"message of {len(value)} bytes exceeds max_message_bytes={max_bytes}"
    try:
        record = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return f"not JSON: {exc}"
    try:
        return to_scan(record, zone)
    except InvalidScan as exc:
        return str(exc)
