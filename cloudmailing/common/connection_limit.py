"""At most so many connections from one source address, counted before TLS or authentication.

Twisted's ``policies.LimitConnectionsByPeer`` means to do this, but it indexes addresses as tuples
(``addr[0]``), which they have not been for years; this is the same idea on its
``WrappingFactory``, keyed by ``addr.host``.
"""

from __future__ import annotations

import logging
from typing import Any

from twisted.internet.interfaces import IAddress
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

log = logging.getLogger(__name__)


class LimitPerSource(WrappingFactory):
    """Wraps the listening factory (the TLS one, so a refused peer gets no handshake): a connection
    from an address that already has ``max_per_source`` open is closed at once."""

    def __init__(self, wrapped: Any, max_per_source: int, name: str) -> None:
        super().__init__(wrapped)
        self.max_per_source = max_per_source
        self._name = name  # which port, for the log
        self._open: dict[str, int] = {}  # address -> connections open; no entry at zero
        self._hosts: dict[ProtocolWrapper, str] = {}
        self._refusing: set[str] = set()  # addresses at their limit, logged once

    def open_from(self, host: str) -> int:
        return self._open.get(host, 0)

    def buildProtocol(self, addr: IAddress | None) -> Any:
        host = str(getattr(addr, "host", addr))
        if self._open.get(host, 0) >= self.max_per_source:
            if host not in self._refusing:
                self._refusing.add(host)
                log.warning("%s: connections refused: %d open from this address already (max_connections_per_source)",
                            self._name, self.max_per_source, extra={"client": host})
            return None  # the reactor closes the connection
        protocol = super().buildProtocol(addr)
        self._open[host] = self._open.get(host, 0) + 1
        self._hosts[protocol] = host
        return protocol

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        super().unregisterProtocol(p)
        host = self._hosts.pop(p, None)
        if host is None:
            return
        self._open[host] -= 1
        if self._open[host] <= 0:
            del self._open[host]
        self._refusing.discard(host)
