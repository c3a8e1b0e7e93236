"""A satellite holds what it can report within half a lease: sized by its report rate."""

from __future__ import annotations

from twisted.internet import task

from cloudmailing.config.settings import DispatchConfig
from cloudmailing.services.lease_budget import LeaseBudget

CONFIG = DispatchConfig(lease_seconds=60, max_lease_size=1000, initial_lease_size=100)


def _ids(start: int, count: int) -> list[str]:
    return [f"r{i}" for i in range(start, start + count)]


def test_a_newcomer_holds_the_initial_size_until_it_reports():
    clock = task.Clock()
    budget = LeaseBudget(clock, CONFIG)
    assert budget.allowance(500) == 100
    budget.leased(_ids(0, 100))
    assert budget.allowance(500) == 0
    clock.advance(50)
    budget.reported(_ids(0, 40))  # 40 in 50 s: slower than the initial size, which stays
    assert budget.budget() == 100 and budget.allowance(500) == 40


def test_a_fast_satellite_gets_more_and_a_slow_one_stays_small():
    clock = task.Clock()
    fast, slow = LeaseBudget(clock, CONFIG), LeaseBudget(clock, CONFIG)
    for second in range(10):
        clock.advance(1)
        fast.leased(_ids(second * 200, 200))
        fast.reported(_ids(second * 200, 200))  # 200 outcomes a second
        slow.leased(_ids(second, 1))
        slow.reported(_ids(second, 1))          # 1 a second
    assert fast.report_rate() == 200 and fast.budget() == 200 * 30
    assert fast.allowance(5000) == 1000  # never more than max_lease_size per call
    assert slow.budget() == 100 and slow.allowance(500) == 100


def test_expired_leases_stop_counting_and_old_reports_leave_the_rate():
    clock = task.Clock()
    budget = LeaseBudget(clock, CONFIG)
    budget.leased(_ids(0, 100))
    clock.advance(59)
    assert budget.allowance(100) == 0
    clock.advance(2)  # the lease expired: its recipients are back in the queue
    assert budget.allowance(100) == 100
    budget.leased(_ids(0, 6000))
    budget.reported(_ids(0, 6000))
    assert budget.budget() == 6000 / 60 * 30
    clock.advance(61)
    assert budget.report_rate() == 0 and budget.budget() == 100


def test_outcomes_of_recipients_not_leased_on_this_link_do_not_raise_the_budget():
    """A reconnecting satellite replays its outbox (leased before, on another link), and a report
    may name ids it never held: counting them made the budget 7,500 times too large at once."""
    clock = task.Clock()
    budget = LeaseBudget(clock, CONFIG)
    clock.advance(0.5)
    budget.reported(_ids(10_000, 5000))
    assert budget.budget() == 100
    budget.leased(_ids(0, 100))
    clock.advance(10)
    budget.reported(_ids(0, 100))  # 100 of its own in 10.5 s: 9.5/s, 285 for half a lease
    assert budget.budget() == 285
