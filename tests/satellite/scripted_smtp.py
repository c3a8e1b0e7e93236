"""A raw scripted SMTP server on loopback: a callback per line received (and, optionally, per
chunk of bytes), to play servers that misbehave at a chosen moment."""
from __future__ import annotations

import asyncio
from typing import Any, Callable


class Scripted(asyncio.Protocol):
    def __init__(self, owner: ScriptedServer) -> None:
        self.owner = owner
        self.buffer = b""
        self.in_data = False
        self.tcp: Any = None
        self.lines: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.tcp = transport
        self.owner.connections.append(self)
        self.owner.on_connect(self)

    def data_received(self, data: bytes) -> None:
        self.owner.received_bytes += len(data)
        if self.owner.on_raw is not None and self.owner.on_raw(self, data):
            return
        self.buffer += data
        while True:
            if self.in_data:
                if self.buffer.startswith(b".\r\n"):
                    self.buffer = self.buffer[3:]
                    self.in_data = False
                    self.owner.on_line(self, b".")
                    continue
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    self.buffer = self.buffer[-4:]
                    return
                self.buffer = self.buffer[end + 5:]
                self.in_data = False
                self.owner.on_line(self, b".")
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return
            line, self.buffer = self.buffer[:end], self.buffer[end + 2:]
            self.lines.append(line)
            self.owner.on_line(self, line)

    def send(self, data: bytes) -> None:
        self.tcp.write(data)


EHLO = b"250-mx.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"


def default_line(p: Scripted, line: bytes) -> None:
    verb = line[:4].upper()
    if verb in (b"EHLO", b"HELO"):
        p.send(EHLO)
    elif verb == b"DATA":
        p.in_data = True
        p.send(b"354 go\r\n")
    elif line == b".":
        p.send(b"250 2.0.0 queued\r\n")
    elif verb == b"QUIT":
        p.send(b"221 bye\r\n")
        p.tcp.close()
    else:
        p.send(b"250 ok\r\n")


class ScriptedServer:
    def __init__(self, on_line: Callable[[Scripted, bytes], None] = default_line,
                 on_connect: Callable[[Scripted], None] | None = None,
                 on_raw: Callable[[Scripted, bytes], bool] | None = None) -> None:
        self.on_line = on_line
        self.on_connect = on_connect or (lambda p: p.send(b"220 mx.test ESMTP\r\n"))
        self.on_raw = on_raw
        self.connections: list[Scripted] = []
        self.received_bytes = 0
        self.server: Any = None

    async def start(self, host: str = "127.0.0.2", port: int = 0, **kw: Any) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: Scripted(self), host, port, **kw)
        return int(self.server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        for p in self.connections:
            if p.tcp is not None:
                p.tcp.abort()
        if self.server is not None:
            self.server.close()
