"""Tensor-parallel collectives of one stage's TP group: sum (``all_reduce_``), ``all_gather`` and ``gather``.

A model file calls them through ``ShardContext.tp_comm`` and never needs to know which of two implementations
it got:

* `DistComm`: torch.distributed on the TP group (nccl on CUDA, gloo on CPU); used whenever `HostComm` is not.
* `HostComm`: CPU tensors of ranks that all run on this host (one rank table address) go through one shared
  memory segment instead of gloo's TCP pairs and helper threads. Measured on the 2-core VM, two processes, 8 KB
  float32: gloo ``all_reduce`` 1.0-1.5 ms wall and 0.7-1.0 ms CPU per call, ``all_gather`` 0.8 ms / 0.55 ms;
  through shared memory 53 us (`bench/bench_collectives.py`). A CPU decode step makes two such sums per layer.

The Agents also share the output rank's per-step plan (`transfer.StageTransfer.broadcast_plan`) through a
`HostComm` of every rank when the whole rank table is on one host: one gloo broadcast per decode step was a
quarter of a TP 2 Agent's step time.

`HostComm` protocol (x86-64 only: it relies on the total store order, so a peer that sees a rank's new sequence
number also sees the data written before it): every rank has a slot in each of two buffers. A call copies this
rank's tensor (in chunks of at most ``slot_bytes``) into its slot of buffer ``seq % 2``, publishes ``seq`` and
waits until every peer published ``seq``; then it reads all slots. A rank can only write buffer ``seq % 2``
again at ``seq + 2``, after every peer published ``seq + 1``, which each does only after it finished reading
``seq``: so two buffers are enough and nobody waits for readers. Every rank sums the slots in rank order
(16-bit floats in float32), so all ranks hold bitwise the same result, as with gloo.

Waiting spins briefly, then yields, then sleeps 50 us at a time (cores may be shared with the peers). A peer
that died (its pid is gone), an `abort` by any rank (it leaves the group) or ``timeout_s`` without progress
raise `CollectiveError`, which fails the batch and makes the group re-form, as a broken gloo pair does. The
segment is unlinked as soon as every rank mapped it, so nothing is left in /dev/shm even after SIGKILL (a creator
killed before that leaves its name, which the next group's creator removes).
"""

from __future__ import annotations

import mmap
import os
import platform
import secrets
import time
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

SLOT_BYTES = 4 << 20  # per rank and buffer; larger tensors go through in chunks
_HEADER = 4096  # abort flag, pids, sequence numbers (one 64-byte line per rank)
_SPINS = 2000  # busy checks before yielding: peers usually arrive within microseconds of each other
_MAX_VIEWS = 64  # cached slot views (buffer x dtype x size); more distinct shapes than this start the cache over
_YIELDS = 200
_SLEEP_S = 50e-6
_LIVENESS_S = 0.1  # how often a waiting rank checks that its peers still exist
_16_BIT = (torch.float16, torch.bfloat16)


class CollectiveError(RuntimeError):
    """A collective cannot complete: a peer died or left, or it timed out. The ranks are out of step."""


class TPComm(Protocol):
    """The collectives of one TP group; every rank of the group calls them in the same order."""

    size: int
    rank: int  # index in the group

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the group, in place; returns ``t``."""

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape and dtype everywhere), in rank order."""

    def gather(self, t: torch.Tensor, dst: int = 0) -> list[torch.Tensor] | None:
        """Every rank's ``t`` in rank order on group rank ``dst``; None on the others."""

    def broadcast_(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """Group rank ``src``'s ``t`` into ``t`` on every rank, in place; returns ``t``."""

    def abort(self) -> None:
        """Make every rank's current and future calls raise `CollectiveError` (this rank leaves the group)."""


class DistComm:
    """`TPComm` over torch.distributed ``group`` (None: a group of one rank, every call is local)."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.size = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)


    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        if self.size == 1:
            return [t]
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return parts

    def gather(self, t: torch.Tensor, dst: int = 0) -> list[torch.Tensor] | None:
        if self.size == 1:
            return [t]
        parts = [torch.empty_like(t) for _ in range(self.size)] if self.rank == dst else None
        dist.gather(t.contiguous(), parts, group=self.group, group_dst=dst)
        return parts

    def broadcast_(self, t: torch.Tensor, src: int) -> torch.Tensor:
        if self.size > 1:
            dist.broadcast(t, group_src=src, group=self.group)
        return t

    def abort(self) -> None:
        """Nothing to do: the peers' calls fail when this process's connections close."""


def host_comm_supported(device: torch.device) -> bool:
    """Whether `HostComm` can serve tensors on ``device`` here (CPU, x86-64, a /dev/shm)."""
    return device.type == "cpu" and platform.machine() in ("x86_64", "AMD64") and os.path.isdir("/dev/shm")


class HostComm:
    """`TPComm` through shared memory for ranks on one host (module docstring). Build it with `connect`."""

    def __init__(self, buf: mmap.mmap, size: int, rank: int, slot_bytes: int, timeout_s: float) -> None:
        self.size, self.rank = size, rank
        self.slot_bytes = slot_bytes
        self.timeout_s = timeout_s
        self._buf = buf
        self._abort = np.frombuffer(buf, dtype=np.int64, count=1, offset=0)
        self._pids = np.frombuffer(buf, dtype=np.int64, count=size, offset=64)
        self._seqs = np.frombuffer(buf, dtype=np.int64, count=8 * size, offset=1024)[::8]  # one line per rank
        self._seq = int(self._seqs[rank])
        self._pids[rank] = os.getpid()
        # (buffer, dtype, element count) -> every rank's slot as a tensor view: `torch.frombuffer` costs a few us
        # per view, and a decode step makes the same few collectives over and over
        self._views: dict[tuple[int, torch.dtype, int], list[torch.Tensor]] = {}

    @staticmethod
    def segment_bytes(size: int, slot_bytes: int) -> int:
        return _HEADER + 2 * size * slot_bytes

    @classmethod
    def connect(cls, store: dist.Store, key: str, group: dist.ProcessGroup | None, size: int, rank: int,
                timeout_s: float, slot_bytes: int = SLOT_BYTES) -> HostComm:
        """Group rank 0 creates the segment and posts its name under ``key`` in ``store``; the others open it;
        after a barrier on ``group`` (None: the default group; every rank mapped it) rank 0 unlinks the name.
        Collective over ``group``."""
        if 1024 + 64 * size > _HEADER:  # pids from byte 64, sequence numbers from byte 1024
            raise ValueError(f"a host group of {size} ranks does not fit the header")
        nbytes = cls.segment_bytes(size, slot_bytes)
        if rank == 0:
            _remove_dead_segments()
            name = f"sf-tp-{os.getpid()}-{secrets.token_hex(8)}"
            fd = os.open(f"/dev/shm/{name}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, nbytes)
                buf = mmap.mmap(fd, nbytes)
            finally:
                os.close(fd)
            store.set(key, name)
        else:
            name = store.get(key).decode()
            if not name.startswith("sf-tp-") or "/" in name:
                raise CollectiveError(f"bad shared-memory segment name {name!r} in the rendezvous")
            fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
            try:
                buf = mmap.mmap(fd, nbytes)
            finally:
                os.close(fd)
        comm = cls(buf, size, rank, slot_bytes, timeout_s)
        dist.barrier(group=group)
        if rank == 0:
            os.unlink(f"/dev/shm/{name}")
        return comm

    # -- the collectives ------------------------------------------------------------------------------------
    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        flat = t.view(-1) if t.is_contiguous() else t.contiguous().view(-1)
        for start, count in self._chunks(flat):
            piece = flat[start:start + count]
            slots = self._exchange(piece)
            if t.dtype in _16_BIT and self.size > 2:
                acc = slots[0].float()
                for s in slots[1:]:
                    acc.add_(s)
                piece.copy_(acc)
            else:  # two ranks: one addition, the same in any precision
                piece.copy_(slots[0])
                for s in slots[1:]:
                    piece.add_(s)
        if flat.data_ptr() != t.data_ptr():
            t.copy_(flat.view(t.shape))
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        flat = t.contiguous().view(-1)
        parts = [torch.empty_like(flat) for _ in range(self.size)]
        for start, count in self._chunks(flat):
            for part, slot in zip(parts, self._exchange(flat[start:start + count])):
                part[start:start + count].copy_(slot)
        return [p.view(t.shape) for p in parts]

    def gather(self, t: torch.Tensor, dst: int = 0) -> list[torch.Tensor] | None:
        flat = t.contiguous().view(-1)
        parts = [torch.empty_like(flat) for _ in range(self.size)] if self.rank == dst else None
        for start, count in self._chunks(flat):
            slots = self._exchange(flat[start:start + count])
            if parts is not None:
                for part, slot in zip(parts, slots):
                    part[start:start + count].copy_(slot)
        return None if parts is None else [p.view(t.shape) for p in parts]

    def broadcast_(self, t: torch.Tensor, src: int) -> torch.Tensor:
        flat = t.view(-1) if t.is_contiguous() else t.contiguous().view(-1)
        for start, count in self._chunks(flat):
            piece = flat[start:start + count]
            slots = self._exchange(piece)  # every rank publishes (the buffer protocol needs it); src's counts
            if self.rank != src:
                piece.copy_(slots[src])
        if flat.data_ptr() != t.data_ptr():
            t.copy_(flat.view(t.shape))
        return t

    def abort(self) -> None:
        self._abort[0] = 1

    # -- internals ------------------------------------------------------------------------------------------
    def _chunks(self, flat: torch.Tensor) -> list[tuple[int, int]]:
        per = max(1, self.slot_bytes // flat.element_size())
        total = flat.numel()
        return [(start, min(per, total - start)) for start in range(0, total, per)] or [(0, 0)]

    def _slots(self, seq: int, like: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's slot of buffer ``seq & 1`` as a tensor of ``like``'s dtype and element count."""
        key = (seq & 1, like.dtype, like.numel())
        views = self._views.get(key)
        if views is None:
            if len(self._views) >= _MAX_VIEWS:
                self._views.clear()
            base = _HEADER + (seq & 1) * self.size * self.slot_bytes
            views = [torch.frombuffer(self._buf, dtype=like.dtype, count=like.numel(),
                                      offset=base + r * self.slot_bytes) if like.numel() else like.new_empty(0)
                     for r in range(self.size)]
            self._views[key] = views
        return views

    def _exchange(self, piece: torch.Tensor) -> list[torch.Tensor]:
        """Publish this rank's ``piece``; returns every rank's, in rank order (views of the segment, valid until
        this rank's next call)."""
        if self._abort[0]:
            raise CollectiveError("the tensor-parallel group was aborted (a rank left it)")
        self._seq += 1
        seq = self._seq
        slots = self._slots(seq, piece)
        slots[self.rank].copy_(piece)
        self._seqs[self.rank] = seq  # after the data: x86-64 keeps stores in order
        for peer in range(self.size):
            if peer != self.rank and self._seqs[peer] < seq:
                self._wait(peer, seq)
        return slots

    def _wait(self, peer: int, seq: int) -> None:
        seqs, abort = self._seqs, self._abort
        for _ in range(_SPINS):
            if seqs[peer] >= seq:
                return
        for _ in range(_YIELDS):
            if seqs[peer] >= seq:
                return
            os.sched_yield()
        start = check = time.monotonic()
        while seqs[peer] < seq:
            if abort[0]:
                raise CollectiveError("the tensor-parallel group was aborted (a rank left it)")
            time.sleep(_SLEEP_S)
            now = time.monotonic()
            if now - check >= _LIVENESS_S:
                check = now
                pid = int(self._pids[peer])
                if not _alive(pid):
                    raise CollectiveError(f"tensor-parallel rank {peer} (pid {pid}) is gone")
                if now - start > self.timeout_s:
                    raise CollectiveError(f"tensor-parallel rank {peer} made no progress for {self.timeout_s:.0f} s")


def _remove_dead_segments() -> None:
    """Unlink segments whose creator died before every rank mapped them (the only window a name exists)."""
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return
    for name in names:
        parts = name.split("-")
        if len(parts) == 4 and name.startswith("sf-tp-") and parts[2].isdigit() and not _alive(int(parts[2])):
            try:
                os.unlink(f"/dev/shm/{name}")
            except OSError:  # another user's, or gone already
                pass


def _alive(pid: int) -> bool:
    """``pid`` exists and has not exited (a zombie its parent has not reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False
