"""The collector's settings after start-up (in a child process: they are process-wide)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import gc
from cloudmailing.common.gc_tuning import YOUNG_THRESHOLD, settle_after_start
started = [dict(n=i) for i in range(1000)]
settle_after_start()
assert gc.get_threshold()[0] == YOUNG_THRESHOLD, gc.get_threshold()
assert gc.get_freeze_count() >= 1000, gc.get_freeze_count()
later = [[] for _ in range(10)]
later[0].append(later)  # a cycle made after start-up is still collected
del later
assert gc.collect() >= 1
print("ok")
"""


def test_start_up_objects_are_frozen_young_collections_are_rarer_and_cycles_still_go() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr
