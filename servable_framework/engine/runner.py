"""The generation loop: every rank of a distributed LLM servable runs it in lockstep.

A *row* is one instance being generated. Rows are admitted in batches (the batch ``predict`` was called for,
then batches that arrived meanwhile and join at a step boundary: continuous batching), decode one token per
step together, and leave when they finish (EOS, ``max_new_tokens``, a stop sequence, or their caller gave up).

Per step:

1. the output rank (first TP rank of the last stage) samples one token per row from the logits of the
   previous forward, decides which rows finish, streams each row's new tokens (``link.stream``), answers
   finished instances at once (``link.emit``) and asks the link how many waiting batches may join;
2. it broadcasts that plan (tokens, finished flags, all done, batches joining) to every rank over the CPU
   group: the one host transfer of a step;
3. every rank drops the finished rows (their KV slots are compacted away), completes the batches whose last
   row finished, runs one decode forward of the remaining rows, then admits the joining batches with one
   prefill forward of all of them.

Admission is one path for every batch: stage 0 validates the instances (`EngineModel.parse`), embeds the
accepted ones and sends one PREFILL `StageMessage` with a status per batch (accepted, bad input, stage-0
failure, empty), so a rejected batch fails alike on every rank and the group stays in step. Any other
exception leaves the ranks possibly out of step: it propagates, and the Agent makes the group re-form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from servable_framework.agent.shard import BatchLink, InstanceValues, InStepError, ShardContext, WaitingBatch
from servable_framework.engine.kv_cache import SlotKVCache
from servable_framework.engine.model import EngineModel, Prompt
from servable_framework.engine.sampling import Sampler, SamplingParams
from servable_framework.engine.transfer import StageKind, StageMessage, StageTransfer

ACCEPTED, BAD_INPUT, STAGE0_FAILED, EMPTY = 0, 1, 2, 3  # per batch offered for admission


@dataclass
class GenerationResult:
    """The output rank's view of one finished batch."""

    tokens: list[list[int]]  # per instance, EOS and stop sequences excluded
    finish_reasons: list[str]  # "eos", "length", "stop" or "cancelled"
    logits: list[np.ndarray] = field(default_factory=list)  # per instance [steps, vocab] (collect_logits only)


@dataclass
class _Row:
    """Output rank: one running row."""

    batch_id: Any
    index: int
    params: SamplingParams
    tokens: list[int] = field(default_factory=list)
    streamed: int = 0  # tokens already streamed (a possible stop-sequence prefix is held back)
    logits: list[np.ndarray] = field(default_factory=list)
    reason: str = ""

    def add(self, token: int, eos: set[int]) -> None:
        """Take the sampled token and decide whether the row is done."""
        if token in eos:
            self.reason = "eos"
            return
        self.tokens.append(token)
        for stop in self.params.stop:
            if len(self.tokens) >= len(stop) and tuple(self.tokens[-len(stop):]) == stop:
                del self.tokens[-len(stop):]
                self.reason = "stop"
                return
        if len(self.tokens) >= self.params.max_new_tokens:
            self.reason = "length"

    def stream_delta(self) -> list[int]:
        """Tokens not streamed yet, holding back a tail that could still become a stop sequence."""
        safe = len(self.tokens)
        if not self.reason:
            for stop in self.params.stop:
                for n in range(min(len(stop) - 1, len(self.tokens)), 0, -1):
                    if tuple(self.tokens[-n:]) == stop[:n]:
                        safe = min(safe, len(self.tokens) - n)
                        break
        delta = self.tokens[self.streamed:safe]
        self.streamed = max(self.streamed, safe)
        return delta


def _to_device(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host values to ``device`` without waiting for the device (pinned memory, asynchronous copy on CUDA)."""
    t = torch.from_numpy(np.ascontiguousarray(values))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


class _Running:
    """Every rank: the rows in row order (= KV slot order), who they belong to, how many each batch has left."""

    def __init__(self) -> None:
        self.owners: list[Any] = []  # batch id per row
        self.left: dict[Any, int] = {}
        self.next_positions: torch.Tensor | None = None  # stage 0
        self.rows: list[_Row] = []  # output rank
        self.by_batch: dict[Any, list[_Row]] = {}  # output rank: every row of a batch not completed yet

    @property
    def size(self) -> int:
        return len(self.owners)


class _NoLink:
    """The link when ``predict`` runs outside an Agent (tests, tools): nothing joins, nothing streams."""

    def __init__(self, batch_id: Any) -> None:
        self.batch_id = batch_id

    def emit(self, batch_id: Any, index: int, outputs: list[Any]) -> None:
        pass

    def complete(self, batch_id: Any, outputs: list[Any] | None) -> None:
        pass

    def fail(self, batch_id: Any, error: Exception) -> None:
        pass

    def joinable(self, active_rows: int) -> int:
        return 0

    def join(self, k: int) -> list[WaitingBatch]:
        return []

    def cancelled(self) -> set[tuple[Any, int]]:
        return set()

    def stopped(self, batch_id: Any, index: int) -> None:
        pass

    def stream(self, pieces: list[tuple[Any, int, list[Any], str | None]]) -> None:
        pass

    def progress(self) -> None:
        pass


class GenerationEngine:
    """Runs batches of one model on one rank (see the module docstring). ``results`` (output rank) holds the
    `GenerationResult` of every batch completed by the last `run`."""

    def __init__(self, model: EngineModel, ctx: ShardContext) -> None:
        self.model, self.ctx = model, ctx
        self.transfer = StageTransfer(ctx)
        kv = model.kv
        self.cache = SlotKVCache(kv.num_layers, kv.kv_heads, kv.head_dim, model.dtype, model.device)
        self.results: dict[Any, GenerationResult] = {}
        self.collect_logits = False

    @torch.inference_mode()
    def run(self, batch_id: Any, instances: list[Any] | None, link: BatchLink | None) -> GenerationResult | None:
        """Generate batch ``batch_id`` (instances on stage-0 ranks, None elsewhere) and whatever joins it, to
        completion. Returns its result on the output rank, None elsewhere; raises its error when it was
        rejected (on every rank alike)."""
        ctx, model = self.ctx, self.model
        link = link if link is not None else _NoLink(batch_id)
        self.results = {}
        self.cache.clear()
        run = _Running()
        sampler = Sampler(model.device) if ctx.is_output_rank else None
        logits = self._admit(run, sampler, [WaitingBatch(batch_id, instances, len(instances or ()))], link,
                             own=batch_id)
        while run.size:
            n = run.size
            plan = self._decide(run, sampler, logits, link) if sampler is not None else None
            plan = self.transfer.broadcast_plan(plan, 2 * n + 2)
            link.progress()
            tokens, finished = plan[:n], plan[n:2 * n].astype(bool)
            all_done, k_next = bool(plan[-2]), int(plan[-1])
            self._drop(run, sampler, finished, link)
            if all_done and k_next == 0:
                break
            parts = []
            if run.size:
                parts.append(self._decode(run, tokens[~finished]))
            joining = link.join(k_next) if k_next else []
            if joining:
                parts.append(self._admit(run, sampler, joining, link, own=None))
            logits = torch.cat([p for p in parts if p is not None]) if sampler is not None and run.size else None
        return self.results.get(batch_id) if ctx.is_output_rank else None

    # ------------------------------------------------------------------ admission

    def _admit(self, run: _Running, sampler: Sampler | None, batches: list[WaitingBatch], link: BatchLink,
               own: Any) -> torch.Tensor | None:
        """Offer ``batches`` for admission (every rank, same list); prefill the accepted ones together.
        Returns their logits on the output rank."""
        ctx, model = self.ctx, self.model
        if ctx.is_first_stage:
            message, prompts = self._prepare(batches)
        else:
            message, prompts = self.transfer.recv((StageKind.PREFILL,)), []
        # [status, error text, instance count] per batch: later stages learn the counts here (the batch
        # ``predict`` was called for reaches them without its instances)
        statuses: list[list[Any]] = message.meta["batches"]
        batches = [WaitingBatch(w.batch_id, w.instances, count, w.arrived)
                   for w, (_, _, count) in zip(batches, statuses)]
        accepted = [w for w, (status, _, _) in zip(batches, statuses) if status == ACCEPTED]
        if accepted:
            t = message.tensors
            view = self.cache.prefill(t["valid"].bool())
            hidden = model.forward(t["hidden"], t["positions"], view)
            message.tensors = {"hidden": hidden, "positions": t["positions"], "valid": t["valid"]}
            run.owners.extend(w.batch_id for w in accepted for _ in range(w.count))
            run.left.update({w.batch_id: w.count for w in accepted})
            if ctx.is_first_stage:
                nxt = t["next_positions"]
                run.next_positions = nxt if run.next_positions is None or not run.size else \
                    torch.cat([run.next_positions, nxt])
        if not ctx.is_last_stage:
            self.transfer.send(message)
        own_error: Exception | None = None
        for w, (status, text, _) in zip(batches, statuses):
            if status == ACCEPTED:
                continue
            if status == EMPTY:
                result = GenerationResult([], [])
                if ctx.is_output_rank:
                    self.results[w.batch_id] = result
                link.complete(w.batch_id, [] if ctx.is_output_rank else None)
                continue
            error: Exception = ValueError(text) if status == BAD_INPUT else InStepError(f"stage 0 failed: {text}")
            if w.batch_id == own:
                own_error = error
            else:
                link.fail(w.batch_id, error)
        if own_error is not None:
            raise own_error
        if not accepted:
            return None
        if sampler is not None:
            params = [SamplingParams.from_wire(p) for p in message.meta["sampling"]] if not prompts else \
                [p.sampling for p in prompts]
            sampler.add(params)
            it = iter(params)
            for w in accepted:
                rows = [_Row(w.batch_id, i, next(it)) for i in range(w.count)]
                run.rows.extend(rows)
                run.by_batch[w.batch_id] = rows
        return model.compute_logits(hidden[:, -1]) if ctx.is_last_stage else None

    def _prepare(self, batches: list[WaitingBatch]) -> tuple[StageMessage, list[Prompt]]:
        """Stage 0: validate and embed the batches offered; the PREFILL message for the next stage."""
        model = self.model
        statuses: list[list[Any]] = []
        prompts: list[Prompt] = []
        for w in batches:
            if not w.count:
                statuses.append([EMPTY, "", 0])
                continue
            try:
                if w.instances is None:
                    raise ValueError("stage-0 ranks must receive the instances")
                parsed = []
                for i, inst in enumerate(w.instances):
                    try:
                        parsed.append(model.parse(inst))
                    except ValueError as exc:
                        raise ValueError(f"instance {i}: {exc}") from None
            except ValueError as exc:
                statuses.append([BAD_INPUT, str(exc), w.count])
            else:
                statuses.append([ACCEPTED, "", w.count])
                prompts.extend(parsed)
        tensors: dict[str, torch.Tensor] = {}
        if prompts:
            try:
                width = max(len(p.token_ids) for p in prompts)
                ids = np.full((len(prompts), width), model.pad_token_id, dtype=np.int64)
                valid = np.zeros((len(prompts), width), dtype=np.int64)
                for b, p in enumerate(prompts):  # left padding: every row's newest token is at -1
                    ids[b, width - len(p.token_ids):] = p.token_ids
                    valid[b, width - len(p.token_ids):] = 1
                valid_t = torch.from_numpy(valid).to(model.device)
                hidden, positions, next_positions = model.embed_prefill(
                    prompts, torch.from_numpy(ids).to(model.device), valid_t)
                tensors = {"hidden": hidden, "positions": positions, "valid": valid_t,
                           "next_positions": next_positions}
            except Exception as exc:  # not the clients' fault: every accepted batch fails with it, in step
                text = f"{type(exc).__name__}: {exc}"
                statuses = [[STAGE0_FAILED, text, c] if s == ACCEPTED else [s, t, c] for s, t, c in statuses]
                prompts = []
        meta = {"batches": statuses, "sampling": [p.sampling.to_wire() for p in prompts]}
        return StageMessage(StageKind.PREFILL, meta, tensors), prompts

    # ------------------------------------------------------------------ one step

    def _decode(self, run: _Running, tokens: np.ndarray) -> torch.Tensor | None:
        """One decode forward of the running rows (``tokens``: each row's newest token)."""
        ctx, model = self.ctx, self.model
        if ctx.is_first_stage:
            assert run.next_positions is not None
            hidden, positions = model.embed_decode(_to_device(tokens, model.device), run.next_positions)
            run.next_positions = run.next_positions + 1
        else:
            message = self.transfer.recv((StageKind.DECODE,))
            hidden, positions = message.tensors["hidden"], message.tensors["positions"]
        hidden = model.forward(hidden, positions, self.cache.decode())
        if not ctx.is_last_stage:
            self.transfer.send(StageMessage(StageKind.DECODE, {}, {"hidden": hidden, "positions": positions}))
            return None
        return model.compute_logits(hidden[:, -1])

    def _decide(self, run: _Running, sampler: Sampler, logits: torch.Tensor | None, link: BatchLink) -> np.ndarray:
        """Output rank: sample, finish, stream and answer rows; the plan every rank follows."""
        n = run.size
        assert logits is not None and logits.shape[0] == n
        tokens = sampler.sample(logits).cpu().numpy()  # the one device -> host copy of the step
        gone = link.cancelled()
        finished = np.zeros(n, dtype=np.int64)
        pieces: list[tuple[Any, int, list[Any], str | None]] = []
        answered: list[_Row] = []
        eos = self.model.eos_token_ids
        host_logits = logits.float().cpu().numpy() if self.collect_logits else None
        for r, row in enumerate(run.rows):
            if (row.batch_id, row.index) in gone:
                row.reason = "cancelled"
                link.stopped(row.batch_id, row.index)
            else:
                if host_logits is not None:
                    row.logits.append(host_logits[r].copy())
                row.add(int(tokens[r]), eos)
            pieces.append((row.batch_id, row.index, [np.asarray(row.stream_delta(), dtype=np.int64)],
                           row.reason or None))
            if row.reason:
                finished[r] = 1
                if row.reason != "cancelled":
                    answered.append(row)
        link.stream(pieces)
        for row in answered:  # its answer is complete (after its last piece): it leaves now, not with its batch
            link.emit(row.batch_id, row.index, [np.asarray(row.tokens, dtype=np.int64)])
        active = n - int(finished.sum())
        k_next = link.joinable(active)
        return np.concatenate([tokens.astype(np.int64), finished, [int(active == 0), k_next]])

    def _drop(self, run: _Running, sampler: Sampler | None, finished: np.ndarray, link: BatchLink) -> None:
        """Every rank: remove the finished rows; complete the batches whose last row finished."""
        if not finished.any():
            return
        done = []
        for r in np.flatnonzero(finished).tolist():
            key = run.owners[r]
            run.left[key] -= 1
            if run.left[key] == 0:
                del run.left[key]
                done.append(key)
        keep = np.flatnonzero(~finished).tolist()
        run.owners = [run.owners[r] for r in keep]
        self.cache.keep(keep)
        if run.next_positions is not None:
            run.next_positions = run.next_positions[torch.tensor(keep, dtype=torch.long,
                                                                 device=run.next_positions.device)]
        if sampler is not None:
            sampler.keep(keep)
            run.rows = [run.rows[r] for r in keep]
        for key in done:
            outputs: list[InstanceValues] | None = None
            if sampler is not None:
                rows = run.by_batch.pop(key)
                result = GenerationResult([r.tokens for r in rows], [r.reason for r in rows],
                                          [np.stack(r.logits) if r.logits else np.empty((0, 0), np.float32)
                                           for r in rows] if self.collect_logits else [])
                self.results[key] = result
                outputs = [[np.asarray(t, dtype=np.int64)] for t in result.tokens]
            link.complete(key, outputs)
