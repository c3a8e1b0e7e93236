"""Who a process is, in a form another process can check: is it still running?

A process is named by its host, the kernel's boot, its pid namespace, its pid and its start
time: a pid reused after a reboot or by a later process does not match. Only a process of the
same host, boot and pid namespace can tell whether another one still runs (on Linux, from
``/proc``); for any other the answer is "unknown".
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

_PROC = Path("/proc")


@dataclass(frozen=True)
class ProcessIdentity:
    host: str
    boot: str  # the kernel's boot id: pids and start times count from a boot
    pid_namespace: str  # a container's pid 7 is not the host's pid 7
    pid: int
    started: int  # clock ticks after boot (field 22 of /proc/<pid>/stat)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> ProcessIdentity:
        return cls(host=str(fields.get("host", "")), boot=str(fields.get("boot", "")),
                   pid_namespace=str(fields.get("pid_namespace", "")), pid=int(fields.get("pid", 0)),
                   started=int(fields.get("started", 0)))

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"


def this_process() -> ProcessIdentity:
    pid = os.getpid()
    return ProcessIdentity(host=socket.gethostname(), boot=_read(_PROC / "sys/kernel/random/boot_id"),
                           pid_namespace=_link(_PROC / "self/ns/pid"), pid=pid, started=_start_time(pid) or 0)


def is_running(other: ProcessIdentity, me: ProcessIdentity | None = None) -> bool | None:
    """Whether ``other`` still runs: True or False when it can be told from here, else None."""
    me = me or this_process()
    if not (me.boot and me.pid_namespace and other.started) or \
            (other.host, other.boot, other.pid_namespace) != (me.host, me.boot, me.pid_namespace):
        return None
    return _start_time(other.pid) == other.started


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started; None if there is none, or only its corpse (a zombie: killed,
    not yet reaped by its parent)."""
    stat = _read(_PROC / str(pid) / "stat")
    if not stat:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: count after its end.
    fields = stat[stat.rfind(")") + 2:].split()
    if len(fields) <= 19 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _link(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""
