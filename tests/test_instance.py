"""Instance names for exactly-once transactional ids: stable across restarts, never shared."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from consumer.instance import claim_instance, transactional_id

REPO = Path(__file__).resolve().parents[1]


def test_live_claims_get_distinct_slots_and_a_released_slot_is_taken_again(tmp_path):
    first = claim_instance("group-a", directory=tmp_path)
    second = claim_instance("group-a", directory=tmp_path)
    other_group = claim_instance("group-b", directory=tmp_path)
    assert first.name != second.name
    assert first.name.endswith("-0") and second.name.endswith("-1")
    assert other_group.name == first.name  # slots are counted per group
    first.release()
    again = claim_instance("group-a", directory=tmp_path)
    assert again.name == first.name
    assert transactional_id("group-a", again) == f"group-a-{first.name}"


def test_a_killed_process_leaves_its_slot_to_the_next_one(tmp_path):
    code = (
        "import os, sys; from pathlib import Path; from consumer.instance import claim_instance;"
        f"i = claim_instance('g', directory=Path({str(tmp_path)!r})); print(i.name, flush=True);"
        "os.kill(os.getpid(), 9)"
    )
    dead = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=REPO
    )
    assert dead.returncode == -9
    assert claim_instance("g", directory=tmp_path).name == dead.stdout.strip()


def test_a_configured_instance_id_is_used_as_given(tmp_path):
    assert claim_instance("g", "pod-7", directory=tmp_path).name == "pod-7"
    assert not list(tmp_path.iterdir())
