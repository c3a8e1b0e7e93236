"""A hard limit on the CPU time of a long-lived worker process, counted on the kernel's own clock.

Template code written by API clients runs in child processes (the satellite's compose workers,
the master's template checks). A render is bounded cooperatively by the sandbox, but one Python
operation it does not count runs in C holding the GIL: only the kernel can end it. The kernel
measures CPU time for that on its *profiling* clock, sampled at each timer tick, and that clock
drifts from the precise CPU time ``getrusage`` reports by several per cent in a process that
sleeps and wakes often (measured here: -3% to +5% over 15 s). ``RLIMIT_CPU`` armed at
``getrusage``'s figure plus a few seconds therefore fired on its own after some minutes of
composing: a 1,000,000-recipient mailing lost 46,872 recipients to it.

``ITIMER_PROF`` runs on that same profiling clock, and :func:`signal.getitimer` reads what is left
of it on that clock too, so the margin asked for is the margin the process has. Its signal,
SIGPROF, ends the process (its default action; nothing here installs a handler for it).
"""

from __future__ import annotations

import signal

KILLED_BY = signal.SIGPROF  # the signal a process over its limit dies of


def ensure_cpu_left(at_least: float, arm_to: float) -> None:
    """Make sure this process may use at least ``at_least`` more CPU seconds, and at most
    ``arm_to`` once re-armed, before SIGPROF ends it. Setting the timer costs a little more than
    reading it, so it is set only when less than ``at_least`` is left (or none was armed)."""
    left, _ = signal.getitimer(signal.ITIMER_PROF)
    if left >= at_least:
        return
    signal.setitimer(signal.ITIMER_PROF, arm_to)

