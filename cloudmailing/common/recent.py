"""Small bounded caches kept in an ``OrderedDict`` (block states, log pages, verified keys, MX
answers, compiled mailings...): the least recently put is dropped first."""

from __future__ import annotations

from collections import OrderedDict
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def keep_recent(cache: OrderedDict[K, V], key: K, value: V, size: int) -> None:
    """Put ``value`` under ``key`` as the most recent, and drop the oldest past ``size``."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > size:
        cache.popitem(last=False)
