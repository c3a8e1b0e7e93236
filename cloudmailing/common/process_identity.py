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
_STARTED = 19  # the start time's place among the fields of /proc/<pid>/stat from the state on


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
    stat = _stat_fields(other.pid)
    if stat is None:  # no such process, or one this user may not see (/proc mounted with hidepid)
        return False if _no_such_process(other.pid) else None
    if stat[0] in ("Z", "X"):  # only its corpse: killed, not yet reaped by its parent
        return False
    return int(stat[_STARTED]) == other.started


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot); None when it cannot be read."""
    stat = _stat_fields(pid)
    return int(stat[_STARTED]) if stat is not None else None


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` from the third (the state) on; None if unreadable."""
    stat = _read(_PROC / str(pid) / "stat")
    # The command name (field 2) is in parentheses and may hold spaces: count after its end.
    fields = stat[stat.rfind(")") + 2:].split() if stat else []
    return fields if len(fields) > _STARTED else None


def _no_such_process(pid: int) -> bool:
    """Whether no process has this pid (a hidden one still answers the null signal, if only
    with a refusal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists, but belongs to another user
        return False
    return False


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
