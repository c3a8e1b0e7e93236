"""The programs' event loop: Twisted's asyncio reactor on uvloop, in the tests as in production."""

from __future__ import annotations

import subprocess
import sys

import uvloop
from twisted.internet import reactor

from tests.conftest import ROOT


def test_the_tests_run_the_reactor_on_uvloop() -> None:
    assert isinstance(reactor._asyncioEventloop, uvloop.Loop)  # type: ignore[attr-defined]


def test_install_reactor_runs_twisted_on_a_uvloop_loop() -> None:
    probe = ("import asyncio, uvloop\n"
             "from cloudmailing.cli.runtime import install_reactor\n"
             "reactor = install_reactor()\n"
             "assert install_reactor() is reactor\n"
             "assert isinstance(reactor._asyncioEventloop, uvloop.Loop)\n"
             "assert asyncio.get_event_loop() is reactor._asyncioEventloop\n"
             "reactor.callWhenRunning(reactor.stop)\n"
             "reactor.run()\n"
             "print('ran')\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ran"
