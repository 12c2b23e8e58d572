"""The job runs' bounds in one process: the row budget grants rows in the order asked, a job
larger than the budget runs alone, a cancelled wait leaves nothing held, and no more jobs
are read while the budget is full."""

from __future__ import annotations

import asyncio

from gateway.dataplane.job_slots import JobSlots, RowBudget


class InFlight:
    in_flight = 0
    max_in_flight = 100


async def hold(budget: RowBudget, rows: int, order: list[int], release: asyncio.Event) -> None:
    async with budget.held(rows):
        order.append(rows)
        await release.wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_rows_are_granted_in_the_order_asked_and_a_large_job_runs_alone() -> None:
    budget = RowBudget(1000)
    order: list[int] = []
    first, large, small = asyncio.Event(), asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(hold(budget, 600, order, first))]
    await settle()
    tasks.append(asyncio.create_task(hold(budget, 5000, order, large)))  # more than it all
    await settle()
    tasks.append(asyncio.create_task(hold(budget, 10, order, small)))  # fits, but waits its turn
    await settle()
    assert order == [600] and budget.used == 600 and budget.full
    first.set()
    await settle()
    assert order == [600, 5000] and budget.used == 1000  # weighed as the whole budget
    large.set()
    await settle()
    assert order == [600, 5000, 10] and budget.used == 10 and not budget.full
    small.set()
    await asyncio.gather(*tasks)
    assert budget.used == 0


async def test_a_cancelled_wait_holds_nothing_and_lets_the_next_in() -> None:
    budget = RowBudget(100)
    order: list[int] = []
    first, later = asyncio.Event(), asyncio.Event()
    holder = asyncio.create_task(hold(budget, 80, order, first))
    await settle()
    stuck = asyncio.create_task(hold(budget, 50, order, later))
    await settle()
    after = asyncio.create_task(hold(budget, 20, order, later))  # fits beside the holder
    await settle()
    assert order == [80]  # behind the one waiting
    stuck.cancel()
    await settle()
    assert order == [80, 20] and budget.used == 100
    first.set()
    later.set()
    await asyncio.gather(holder, after)
    assert stuck.cancelled() and budget.used == 0 and not budget.full


async def test_runs_cancelled_all_at_once_end_cancelled_holding_nothing() -> None:
    """A stop cancels every run at once: a holder's give-back granted a waiter cancelled but
    not yet woken (InvalidStateError), which then removed a turn already gone (ValueError);
    both replaced the CancelledError, so the jobs ended failed with a 500 instead of being
    handed back, and their rows stayed counted (a helper's faults probe)."""
    budget = RowBudget(2000)
    order: list[int] = []
    never = asyncio.Event()
    runs = [asyncio.create_task(hold(budget, 1000, order, never)) for _ in range(3)]
    await settle()
    assert order == [1000, 1000] and budget.full  # the third waits
    for run in runs:
        run.cancel()
    outcomes = await asyncio.gather(*runs, return_exceptions=True)
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes), outcomes
    assert budget.used == 0 and not budget.full


async def test_no_job_is_read_while_the_row_budget_is_full() -> None:
    slots = JobSlots(8, InFlight(), rows=100)
    assert slots.room() == 8
    release = asyncio.Event()
    holder = asyncio.create_task(hold(slots.rows, 100, [], release))
    await settle()
    assert slots.room() == 0
    reader = asyncio.create_task(slots.reserve(readers=1, idle=False))
    await asyncio.sleep(0.1)
    assert not reader.done()  # waits for rows to come back, reading nothing meanwhile
    release.set()
    assert await asyncio.wait_for(reader, 1.0) == 8
    await holder
