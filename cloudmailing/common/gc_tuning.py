"""The garbage collector's settings for our long-running processes.

CPython's cyclic collector runs a young collection every 700 net allocations of container
objects, and each one walks every young object still alive. A report or a lease allocates tens of
thousands of short-lived dicts and tuples that live for milliseconds to seconds: the default
walks them again and again as they move up the generations (measured with ``perf``: 5-10% of the
master's and the satellite's CPU during a mailing). Almost nothing we allocate forms cycles, so
collecting less often costs little memory.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000  # net container allocations between two young collections (default 700)


def settle_after_start() -> None:
    """Call once start-up is done: what is alive now (modules, configuration, compiled templates)
    is kept out of every later collection (``gc.freeze``), and young collections run less often."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
