"""Admission draining: it wakes when the last job is released, and interrupts at the grace end."""

from __future__ import annotations

import asyncio

from server.admission import Admission


class Job:
    size = 1

    def __init__(self) -> None:
        self.interrupted = False

    def interrupt(self) -> None:
        self.interrupted = True


def test_drain_returns_when_the_last_job_is_released():
    async def scenario():
        admission = Admission(4)
        first, second = Job(), Job()
        admission.add(first)
        admission.add(second)
        drain = asyncio.create_task(admission.drain(grace_s=3600))
        await asyncio.sleep(0)
        assert admission.draining and not drain.done()
        admission.release(first)
        await asyncio.sleep(0)
        assert not drain.done()  # one job still running
        admission.release(second)
        await asyncio.wait_for(drain, 5)  # woken by the release, not by the hour-long grace
        assert admission.idle and not first.interrupted and not second.interrupted

    asyncio.run(scenario())


def test_drain_interrupts_the_jobs_left_at_the_end_of_the_grace_period():
    async def scenario():
        admission = Admission(4)
        done, stuck = Job(), Job()
        admission.add(done)
        admission.add(stuck)
        admission.release(done)
        await admission.drain(grace_s=0.01)
        assert stuck.interrupted and not done.interrupted

    asyncio.run(scenario())


def test_drain_with_nothing_running_returns_at_once():
    async def scenario():
        admission = Admission(4)
        await asyncio.wait_for(admission.drain(grace_s=3600), 5)
        assert admission.draining

    asyncio.run(scenario())
