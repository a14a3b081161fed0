"""Busy polling: keep the event loop's thread on its CPU for a short while instead of sleeping in ``epoll``.

At concurrency 1 a MindSpore predict crosses four process wake-ups (client -> Main -> Worker -> Main -> client),
where an app that runs its model in-process has two. On a VM a wake-up of a process that sleeps on an idle vCPU
is slow and noisy (the hypervisor has to bring the vCPU back), and the waker pays part of it. When Main polls
instead of sleeping while its only request is in the Worker, the reply finds it awake: on the 2-core CI machine
kind, c=1 p50 0.75-0.96 -> 0.59-0.64 ms over HTTP (`wrk`), 1.0-1.9 -> 0.66-0.75 ms over the local ZMQ Client
(interleaved A/B, README "Hot path").

`BusyPoll` polls the loop's own ``epoll`` descriptor, which is readable when any descriptor the loop watches is:
the spin ends at the first event of any kind (the Worker's reply, a new client request, a heartbeat), and the
loop then handles it without sleeping. Timers wait at most ``budget_s`` longer. The spin yields its CPU at every
turn (``sched_yield``): a process the scheduler woke onto the same CPU runs first. The caller decides when it pays
(`servable_framework.main.dispatcher`: only while a single request is in flight, and only towards a Worker whose
last answer came within the budget), since a spinning thread takes a CPU the other processes may need.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import time

log = logging.getLogger("servable_framework.busy_poll")


def _backend_fd(loop: asyncio.AbstractEventLoop) -> int | None:
    """The ``epoll`` descriptor behind ``loop`` (uvloop's libuv backend, or asyncio's selector); None if unknown."""
    get = getattr(loop, "_get_backend_id", None)  # uvloop
    if get is not None:
        return int(get())
    selector = getattr(loop, "_selector", None)  # asyncio's selector loops
    fileno = getattr(selector, "fileno", None)
    return int(fileno()) if fileno is not None else None


class BusyPoll:
    """Spins (`BusyPoll.__call__`) on one loop's ``epoll`` descriptor for at most ``budget_s``. With a budget of 0,
    or a loop whose descriptor cannot be found (logged once), a call returns at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop, budget_s: float) -> None:
        self.budget_s = budget_s
        self._poll: select.poll | None = None
        fd = _backend_fd(loop) if budget_s > 0 else None
        if fd is not None:
            self._poll = select.poll()
            self._poll.register(fd, select.POLLIN)
        elif budget_s > 0:
            log.info("busy polling is off: this event loop (%s) does not show its epoll descriptor",
                     type(loop).__name__)

    def __call__(self) -> bool:
        """Spin until the loop has an event to handle (True) or the budget is spent (False). Loop thread only."""
        poll = self._poll
        if poll is None:
            return False
        clock, yield_cpu = time.perf_counter, os.sched_yield
        end = clock() + self.budget_s
        while not poll.poll(0):
            if clock() > end:
                return False
            # a process woken onto this CPU (the Worker, when the scheduler placed it here) runs first: without
            # this it waited behind the spin, +0.6-1.7 ms at c=1 from a slow client (httpx) whose pauses let the
            # other vCPU go idle
            yield_cpu()
        return True
