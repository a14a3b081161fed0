"""`busy_poll.BusyPoll`: a spin on a real event loop's epoll descriptor ends at the loop's first event, or when its
budget is spent; with no budget, or a loop that hides its descriptor, it does nothing."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable

import pytest
import uvloop

from servable_framework.busy_poll import BusyPoll

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"uvloop": uvloop.new_event_loop,
                                                             "asyncio": asyncio.new_event_loop}


@pytest.fixture(params=list(LOOPS))
def loop(request):
    loop = LOOPS[request.param]()
    yield loop
    loop.close()


def test_spin_ends_at_the_loops_first_event(loop) -> None:
    """Data arriving on a socket the loop watches ends the spin (a long budget notwithstanding), and the loop's
    own reader then gets that data."""
    ours, theirs = socket.socketpair()
    got: list[bytes] = []
    loop.add_reader(ours.fileno(), lambda: got.append(ours.recv(16)))
    spin = BusyPoll(loop, budget_s=30.0)
    writer = threading.Timer(0.05, theirs.send, (b"answer",))

    async def scenario() -> tuple[bool, float]:
        await asyncio.sleep(0.01)  # a loop turn that polls: libuv adds a new reader to epoll only then
        writer.start()
        start = time.perf_counter()
        ended = spin()
        return ended, time.perf_counter() - start

    try:
        ended, took = loop.run_until_complete(scenario())
        assert ended is True
        assert 0.04 < took < 10, took  # it waited for the data, and not for the whole budget
        loop.run_until_complete(asyncio.sleep(0))  # one loop turn: the reader runs
        assert got == [b"answer"]
    finally:
        writer.cancel()
        loop.remove_reader(ours.fileno())
        ours.close()
        theirs.close()


def test_spin_gives_up_after_its_budget(loop) -> None:
    ours, theirs = socket.socketpair()
    loop.add_reader(ours.fileno(), lambda: None)
    spin = BusyPoll(loop, budget_s=0.05)

    async def scenario() -> tuple[bool, float]:
        start = time.perf_counter()
        return spin(), time.perf_counter() - start

    try:
        ended, took = loop.run_until_complete(scenario())
        assert ended is False
        assert took >= 0.05
    finally:
        loop.remove_reader(ours.fileno())
        ours.close()
        theirs.close()


def test_no_budget_or_no_descriptor_does_nothing(loop, caplog) -> None:
    start = time.perf_counter()
    assert BusyPoll(loop, budget_s=0.0)() is False
    assert time.perf_counter() - start < 0.05

    class Hidden(asyncio.AbstractEventLoop):  # neither uvloop's backend id nor a selector
        pass

    with caplog.at_level(logging.INFO, logger="servable_framework.busy_poll"):
        off = BusyPoll(Hidden(), budget_s=1.0)
    start = time.perf_counter()
    assert off() is False
    assert time.perf_counter() - start < 0.5
    assert any("busy polling is off" in r.getMessage() for r in caplog.records)
