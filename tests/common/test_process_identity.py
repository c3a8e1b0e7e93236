"""Telling whether a process named by its identity still runs."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from cloudmailing.common import process_identity
from cloudmailing.common.process_identity import ProcessIdentity, is_running, this_process


def test_this_process_runs_and_survives_a_round_trip_through_a_document():
    me = this_process()
    assert me.started > 0 and me.boot and me.pid_namespace
    assert is_running(ProcessIdentity.from_dict(me.as_dict()), me) is True


def test_an_exited_process_and_a_reused_pid_are_not_running():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    me = this_process()
    named = dataclasses.replace(me, pid=child.pid, started=process_identity._start_time(child.pid) or 1)
    child.wait()
    assert is_running(named, me) is False
    assert is_running(dataclasses.replace(me, started=me.started + 1), me) is False  # my pid, another start


def test_a_process_of_another_host_boot_or_namespace_cannot_be_told():
    me = this_process()
    for change in ({"host": "elsewhere"}, {"boot": "x"}, {"pid_namespace": "pid:[1]"}):
        assert is_running(dataclasses.replace(me, **change), me) is None


def test_a_command_name_with_spaces_and_parentheses_does_not_shift_the_start_time(monkeypatch):
    stat = "77 (a) b (c) d) S 1 77 77 0 -1 4194560 10 0 0 0 0 0 0 0 20 0 1 0 123456 1000 10"
    monkeypatch.setattr(process_identity, "_read", lambda path: stat)
    assert process_identity._start_time(77) == 123456


def test_a_killed_process_not_yet_reaped_is_not_running():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    me = this_process()
    named = dataclasses.replace(me, pid=child.pid, started=process_identity._start_time(child.pid) or 1)
    assert is_running(named, me) is True
    child.kill()
    while open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        pass  # dying: a zombie until this test (its parent) reaps it
    assert is_running(named, me) is False
    child.wait()


def test_a_process_hidden_from_this_user_is_not_taken_for_gone(monkeypatch):
    """With /proc mounted hidepid=2, another user's processes have no readable stat: one that
    still answers the null signal may run (None: wait for its claim to expire); no answer, gone."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    me = this_process()
    named = dataclasses.replace(me, pid=child.pid, started=process_identity._start_time(child.pid) or 1)
    monkeypatch.setattr(process_identity, "_read", lambda path: "")  # no /proc file readable, as under hidepid
    try:
        assert is_running(named, me) is None
    finally:
        child.kill()
        child.wait()
    assert is_running(named, me) is False  # reaped: no process answers to its pid
