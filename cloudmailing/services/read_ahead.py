"""Reading the next page of a cursor while its reader digests the last one.

A client reading the change log (``get_recipients_status_updated_since``) asks for a page, parses
it, then asks for the next: the master idles while the client parses, and the client waits while
the master reads. After a full page, the master starts reading the page after it at once; the
reader's next call, for that very cursor and filters, takes it ready. A page read ahead is as
exact as one read on demand: it holds the changes committed when it was read, and the cursor it
ends with continues from there.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Coroutine, Hashable
from typing import Any

from cloudmailing.services.clock import SecondsClock

KEPT_SECONDS = 30.0  # a page read ahead that nobody took by then is dropped
MAX_PAGES = 16  # readers followed at once; a new one pushes out the oldest


class ReadAhead:
    """Pages being read ahead, by the request that will ask for them."""

    def __init__(self, clock: SecondsClock) -> None:
        self._clock = clock
        self._pages: OrderedDict[Hashable, tuple[float, asyncio.Task[Any]]] = OrderedDict()

    def start(self, request: Hashable, reading: Coroutine[Any, Any, Any]) -> None:
        """Begin ``reading`` the answer to ``request``, for whoever asks for it next."""
        self._drop(self._pages.pop(request, None))
        self._pages[request] = (self._clock.seconds(), asyncio.ensure_future(reading))
        while len(self._pages) > MAX_PAGES:
            self._drop(self._pages.popitem(last=False)[1])

    async def take(self, request: Hashable) -> Any | None:
        """The answer read ahead for ``request`` (once), or None: read it now."""
        self._expire()
        started = self._pages.pop(request, None)
        if started is None:
            return None
        try:
            return await started[1]
        except Exception:  # noqa: BLE001 - the database failed meanwhile: the caller reads again
            return None

    def _expire(self) -> None:
        now = self._clock.seconds()
        for request, (started_at, _) in list(self._pages.items()):
            if now - started_at > KEPT_SECONDS:
                self._drop(self._pages.pop(request))

    @staticmethod
    def _drop(page: tuple[float, asyncio.Task[Any]] | None) -> None:
        if page is None:
            return
        task = page[1]
        if task.done():
            if not task.cancelled():
                task.exception()  # retrieved: no "never retrieved" warning
        else:
            task.cancel()
