"""Agent startup script for tests: ``python -m tests.support.agents ADDRESS FILE [FILE ...] [--rank-start N
--agent-ip IP]`` (contract §6.3: the two go together).

Also test shards, found by ``declare_servable(shard="tests.support.agents:<Class>")``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.distributed as dist

from servable_framework.agent.shard import InstanceValues, InStepError, ModelShard
from servable_framework.server import distributed


class StreamShard(ModelShard):
    """A deterministic "LLM" for streaming tests (``tests/support/servables/streamer``). Each instance is
    ``[tokens (int64 [n]), params (float64 [step_ms, fail_at])]``; its output is the same tokens, produced a few
    per step (`CHUNKS`, cycling: 1, 2, then none) and streamed the way the engine does: per step, ``link.emit``
    of every instance that finished, then one ``link.stream`` call with each running instance's new tokens.
    An instance whose caller gave up (``link.cancelled``) finishes "cancelled" at the next step
    (``link.stopped``). A step lasts ``step_ms`` (the largest of the batch). ``fail_at >= 0``: once an instance
    has produced that many tokens the batch fails on the output rank (an in-step failure: every rank was told).

    Ranks step in lockstep (one stage, any TP size): the output rank broadcasts ``[go on, failed]`` each step.
    """

    CHUNKS = (1, 2, 0)

    def predict(self, instances: list[InstanceValues] | None) -> list[InstanceValues] | None:
        assert self.ctx.stage_size == 1, "StreamShard runs on one stage"
        if not self.ctx.is_output_rank:
            while True:
                flag = self._step_flag(go_on=True, failed=False)
                if not flag[0]:
                    return None
        assert instances is not None and self.link is not None
        link, batch_id = self.link, self.link.batch_id
        rows = [np.asarray(inst[0], np.int64).reshape(-1) for inst in instances]
        params = [np.asarray(inst[1], np.float64).reshape(-1) for inst in instances]
        step_s = max(float(p[0]) for p in params) / 1000.0
        fail_at = [int(p[1]) for p in params]
        made = [0] * len(rows)
        done = [False] * len(rows)
        step = 0
        while True:
            time.sleep(step_s)
            gone = link.cancelled()
            pieces: list[tuple[int, int, InstanceValues, str | None]] = []
            failed = False
            for i, row in enumerate(rows):
                if done[i]:
                    continue
                if (batch_id, i) in gone:
                    done[i] = True
                    link.stopped(batch_id, i)
                    pieces.append((batch_id, i, [row[:0]], "cancelled"))
                    continue
                new = row[made[i]:made[i] + self.CHUNKS[step % len(self.CHUNKS)]]
                made[i] += len(new)
                failed = failed or 0 <= fail_at[i] <= made[i]
                finish = "length" if made[i] >= len(row) else None
                if finish is not None:
                    done[i] = True
                    link.emit(batch_id, i, [row.copy()])
                pieces.append((batch_id, i, [new.copy()], finish))
            link.stream(pieces)
            self._step_flag(go_on=not all(done) and not failed, failed=failed)
            if failed:
                raise InStepError(f"injected failure after {max(made)} tokens")
            if all(done):
                return [[row[:n].copy()] for row, n in zip(rows, made)]
            step += 1

    def _step_flag(self, go_on: bool, failed: bool) -> list[int]:
        flag = torch.tensor([int(go_on), int(failed)], dtype=torch.int64)
        if self.ctx.rank_size > 1:
            dist.broadcast(flag, src=self.ctx.rank_size - self.ctx.tp_size, group=self.ctx.tp_group)
        return [int(v) for v in flag.tolist()]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("address")
    p.add_argument("files", nargs="+")
    p.add_argument("--rank-start", type=int)
    p.add_argument("--agent-ip")
    p.add_argument("--max-restarts", type=int, default=3)
    a = p.parse_args()
    distributed.startup_agents(a.address, model_files=a.files, rank_start=a.rank_start, agent_ip=a.agent_ip,
                               max_restarts=a.max_restarts)


if __name__ == "__main__":
    main()
