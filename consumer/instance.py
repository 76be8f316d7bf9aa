"""A detector instance's stable name, so a restarted process fences its predecessor at once.

In exactly-once mode every batch is a Kafka transaction. A process killed in the middle of one
leaves that transaction open, and until it is resolved no `read_committed` reader of the alert or
changelog partitions it touched gets past its first record: not a subscriber, and not a detector
restoring its windows. The broker aborts it on its own only after `transaction.timeout.ms` plus
its cleanup interval (up to 40 s with epcwatch's timeout and the broker's defaults). A producer
that starts with the same `transactional.id` aborts it at once, in `init_transactions`.

So the transactional id must outlive the process but never be shared by two live ones. An
operator can name the instance (`instance_id`, e.g. a pod name from a StatefulSet); otherwise a
process claims the lowest free slot `<host>-<n>` of its group on this host by holding a lock file
for its lifetime. The kernel releases the lock when the process dies, however it dies, so the next
detector started on the host takes the slot over and fences the dead one's transaction.
"""

from __future__ import annotations

import re
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

# More detector processes than this in one group on one host is a configuration error.
MAX_SLOTS_PER_HOST = 256


@dataclass
class Instance:
    """A claimed instance name; the claim (if any) lasts until `release` or process exit."""

    name: str
    lock: FileLock | None = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def lock_dir() -> Path:
    return Path(tempfile.gettempdir()) / "epcwatch-instances"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def claim_instance(group_id: str, configured: str = "", directory: Path | None = None) -> Instance:
    """`configured` if given; else the lowest slot of `group_id` on this host no live process
    holds."""
    if configured:
        return Instance(configured)
    directory = directory or lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    host = _safe(socket.gethostname())
    for slot in range(MAX_SLOTS_PER_HOST):
        lock = FileLock(directory / f"{_safe(group_id)}.{slot}.lock", thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue
        return Instance(f"{host}-{slot}", lock)
    raise RuntimeError(
        f"{MAX_SLOTS_PER_HOST} detectors of group {group_id!r} already run on this host "
        f"(lock files in {directory}); set EPCWATCH_INSTANCE_ID to name this one"
    )


def transactional_id(group_id: str, instance: Instance) -> str:
    return f"{group_id}-{instance.name}"
