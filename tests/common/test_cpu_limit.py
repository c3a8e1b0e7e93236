"""The CPU time limit of worker processes, counted on the kernel's profiling clock."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
import textwrap

from cloudmailing.common.cpu_limit import KILLED_BY


def run_child(code: str) -> tuple[int, float, str]:
    """Exit code, CPU seconds and output of a child running ``code``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                           timeout=60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return child.returncode, cpu, child.stdout + child.stderr


def test_the_margin_is_what_the_kernel_counts_left_and_is_topped_up_only_when_short():
    code, _, output = run_child("""
        import signal, time
        from cloudmailing.common.cpu_limit import ensure_cpu_left

        def left():
            return signal.getitimer(signal.ITIMER_PROF)[0]

        def burn(seconds):
            end = time.process_time() + seconds
            while time.process_time() < end:
                pass

        ensure_cpu_left(1.0, 1.5)
        armed = left()
        burn(0.2)
        ensure_cpu_left(1.0, 1.5)  # still over 1 s left: not set again
        kept = left()
        burn(0.5)
        ensure_cpu_left(1.0, 1.5)  # under 1 s left: set again
        print(armed, kept, left())
    """)
    assert code == 0, output
    armed, kept, topped_up = map(float, output.split())  # set in whole timer ticks: up to 10 ms more
    assert 1.4 <= armed <= 1.51
    assert 1.0 <= kept <= 1.4  # the 0.2 s spent counted, nothing added
    assert 1.4 <= topped_up <= 1.51


def test_a_process_that_keeps_spending_is_ended_once_its_margin_is_spent():
    code, cpu, output = run_child("""
        from cloudmailing.common.cpu_limit import ensure_cpu_left

        ensure_cpu_left(0.3, 0.6)
        while True:  # one long operation: nothing tops the margin up
            pass
    """)
    assert code == -KILLED_BY == -signal.SIGPROF, output
    assert 0.4 <= cpu <= 3.0


def test_a_worker_topping_up_before_each_piece_of_work_lives_on():
    code, cpu, output = run_child("""
        import time
        from cloudmailing.common.cpu_limit import ensure_cpu_left

        end = time.process_time() + 1.5
        while time.process_time() < end:  # 1.5 s of CPU in small pieces, each under 0.3 s
            ensure_cpu_left(0.3, 0.6)
            piece = time.process_time() + 0.01
            while time.process_time() < piece:
                pass
        print("alive")
    """)
    assert code == 0 and "alive" in output, output
    assert cpu >= 1.5
