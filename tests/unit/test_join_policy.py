"""When the output rank lets waiting batches join a running decode loop (continuous batching): the same rule
as the Worker's batcher, applied to the Agent's inbox."""

from __future__ import annotations

import time
from types import SimpleNamespace

from servable_framework.agent.agent import Inbox, _Link
from servable_framework.agent.shard import WaitingBatch


def link(max_rows: int, delay_ms: float, *counts: int, waited_s: float = 0.0) -> _Link:
    inbox = Inbox()
    for n, count in enumerate(counts):
        inbox.put(WaitingBatch(10 + n, None, count, arrived=time.monotonic() - waited_s))
    agent = SimpleNamespace(inbox=inbox, rank=0, cfg=SimpleNamespace(continuous_batching=True, max_batch_rows=max_rows,
                                                                      max_batch_delay_ms=delay_ms))
    return _Link(agent, 1, None)  # type: ignore[arg-type]  # no loop: joinable sends nothing


def test_nothing_joins_without_continuous_batching() -> None:
    lk = link(8, 0, 1)
    lk.max_rows = 0
    assert lk.joinable(0) == 0


def test_joins_at_once_when_nothing_else_runs_or_the_rows_are_full() -> None:
    assert link(8, 1000, 1, 2).joinable(0) == 2  # every row finished: no reason to wait
    assert link(8, 1000, 2, 2).joinable(4) == 2  # 4 running + 4 waiting fill the 8 rows


def test_a_small_joiner_waits_for_company_up_to_the_batch_delay() -> None:
    assert link(8, 1000, 1).joinable(3) == 0  # one row, just arrived, rows to spare: gather more first
    assert link(8, 50, 1, waited_s=0.06).joinable(3) == 1  # waited its max_batch_delay_ms: joins
    assert link(8, 0, 1).joinable(3) == 1  # no delay configured: joins at the next step


def test_only_batches_that_fit_join_and_in_order() -> None:
    assert link(8, 1000, 3, 4, 1).joinable(2) == 1  # 3 fits in 6 free rows, 3 + 4 does not: join the 3 now
    assert link(8, 0, 7).joinable(2) == 0  # too big for the free rows: waits for rows to finish
