"""Shared-memory tensors between a ZMQ `Client` and the Workers on the same host.

A large tensor (`MIN_BYTES` and up) of a co-located Client does not travel through the sockets (Client -> Main ->
Worker -> Main -> Client: eight kernel copies of 64 MiB): the Client writes it once into a segment of its own under
``/dev/shm`` and sends a reference, ``{"t": "shm", "seg": name, "off": offset, "dtype": ..., "shape": [...]}``
(`ShmTensor`). Main passes references on untouched; the Worker maps the segment and hands the stages a read-only
view, no copy. The request also offers the rest of the segment as reply space (header ``"shm_out"``:
`ReplySpace`); the Worker writes each large output there (or, when an output is a view of the Client's own
segment already, names where it lies, no copy), and the Client returns read-only views of the segment. Small
tensors stay inline.

Safety: segment names are ``sf-shm-<pid>-`` + 128 random bits (`NAME`, checked before a name reaches the file
system), created ``0600``; a new Client removes the segments of Client processes that died without closing; a
reference is bounds-checked against the segment's size; a Worker writes only into the reply space of the request
it answers. A Client reuses a segment only after the Worker answered its call with results and the outputs that
are views of it are gone: the segment of a call that timed out or failed as a whole is unlinked, never reused,
so a Worker still running it cannot write into a later call's tensors. Where the Worker cannot open the segment
(another host, another container's ``/dev/shm``) or Main refuses references (setting ``shared_memory=False``),
the request fails with an error containing `REFUSED`; the Client then sends the tensors inline and stops trying.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import re
import secrets
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np

from servable_framework.errors import InvalidInput

SHM_DIR = "/dev/shm"
PREFIX = "sf-shm-"
NAME = re.compile(r"sf-shm-[0-9]{1,10}-[0-9a-f]{32}")  # sf-shm-<creating pid>-<128 random bits>
MIN_BYTES = 1 << 20  # below this a tensor travels inline: a reference and a mapping cost more than the copy
ALIGN = 64  # tensors start on cache-line boundaries
REFUSED = "shared memory unavailable"  # in the error text of a request whose references cannot be served
IDLE_SEGMENTS = 2  # a Client keeps this many answered segments for reuse (each the size of its largest call)
MAPPED_SEGMENTS = 16  # a Worker keeps this many segments mapped


def available() -> bool:
    """Whether this host has a ``/dev/shm`` this process may create segments in."""
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class ShmTensor:
    """A tensor in a shared-memory segment: ``dtype`` (a wire dtype name) and ``shape`` from byte ``off`` on."""

    seg: str
    off: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def descriptor(self) -> dict[str, Any]:
        return {"t": "shm", "seg": self.seg, "off": self.off, "dtype": self.dtype, "shape": list(self.shape)}


def keep_reference(ref: ShmTensor) -> ShmTensor:
    """Main's reader of shared-memory tensors: it passes references on and never maps a segment."""
    return ref


def parse_tensor(desc: dict[str, Any], dtypes: dict[str, np.dtype[Any]]) -> ShmTensor:
    """A ``{"t": "shm", ...}`` descriptor checked for shape only (the segment's size is checked on mapping)."""
    seg, off, dtype, shape = desc.get("seg"), desc.get("off"), desc.get("dtype"), desc.get("shape")
    if not isinstance(seg, str) or not NAME.fullmatch(seg):
        raise InvalidInput("malformed shared memory descriptor: bad segment name")
    if not _count(off):
        raise InvalidInput("malformed shared memory descriptor: bad offset")
    if dtype not in dtypes:
        raise InvalidInput(f"Unknown data type {dtype!r}")
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        raise InvalidInput(f"malformed tensor shape {shape!r}")
    return ShmTensor(seg, off, dtype, tuple(shape))


@dataclass(frozen=True)
class ReplySpace:
    """Bytes ``[off, off + size)`` of segment ``seg`` that a request offers for its outputs."""

    seg: str
    off: int
    size: int

    def header(self) -> dict[str, Any]:
        return {"seg": self.seg, "off": self.off, "size": self.size}


def parse_space(raw: Any) -> ReplySpace | None:
    """The ``"shm_out"`` header entry (None: absent). Raises `InvalidInput` when malformed."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidInput("malformed shm_out: not a map")
    seg, off, size = raw.get("seg"), raw.get("off"), raw.get("size")
    if not isinstance(seg, str) or not NAME.fullmatch(seg):
        raise InvalidInput("malformed shm_out: bad segment name")
    if not (_count(off) and _count(size)):
        raise InvalidInput("malformed shm_out: bad offset or size")
    return ReplySpace(seg, off, size)


def _count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class Segment:
    """One mapped file under ``/dev/shm`` (read-write)."""

    def __init__(self, name: str, fd: int) -> None:
        self.name = name
        try:
            self.size = os.fstat(fd).st_size
            self.mm = mmap.mmap(fd, self.size) if self.size else None
        finally:
            os.close(fd)
        self.bytes = np.frombuffer(self.mm, dtype=np.uint8) if self.mm is not None else np.empty(0, np.uint8)
        self.base = self.bytes.ctypes.data  # where the mapping starts in this process

    @classmethod
    def create(cls, size: int) -> Segment:
        """A new segment of ``size`` bytes with a fresh random name (mode 0600)."""
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(16)}"
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            os.unlink(os.path.join(SHM_DIR, name))
            raise
        return cls(name, fd)

    @classmethod
    def open(cls, name: str) -> Segment:
        """Map an existing segment; raises `InvalidInput` (with `REFUSED`) when it cannot be opened here."""
        if not NAME.fullmatch(name):
            raise InvalidInput("malformed shared memory segment name")
        try:
            fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        except OSError as exc:
            raise InvalidInput(f"{REFUSED}: segment {name} cannot be opened on this host ({exc.strerror}); send "
                               f"the tensors inline") from None
        return cls(name, fd)

    def view(self, off: int, nbytes: int) -> np.ndarray:
        """Bytes ``[off, off + nbytes)`` as a uint8 array; raises `InvalidInput` when out of the segment."""
        if off < 0 or nbytes < 0 or off + nbytes > self.size:
            raise InvalidInput(f"shared memory tensor out of bounds: bytes [{off}, {off + nbytes}) of a "
                               f"{self.size}-byte segment")
        return self.bytes[off:off + nbytes]

    def array(self, ref: ShmTensor) -> np.ndarray:
        """The tensor ``ref`` names, as a view of this segment."""
        dtype = np.dtype(ref.dtype)
        raw = self.view(ref.off, ref.nbytes)
        if ref.nbytes and ref.off % dtype.alignment:
            raw = raw.copy()  # a misaligned offset from a foreign client: correct, if slower
        return raw.view(dtype).reshape(ref.shape)

    def unlink(self) -> None:
        try:
            os.unlink(os.path.join(SHM_DIR, self.name))
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Drop the mapping once no array uses it (numpy views keep the mmap alive until they go)."""
        self.bytes = np.empty(0, np.uint8)
        self.mm = None


class Lease:
    """A Client call's segment: its tensors from byte 0, then the reply space (``reply_off`` on)."""

    def __init__(self, segment: Segment, reply_off: int, pool: SegmentPool) -> None:
        self.segment = segment
        self.reply_off = reply_off
        self.pool = pool
        self.cursor = 0
        self.finished = False
        self._owner: Any = None  # the buffer the outputs are views of (`read`)

    def put(self, arr: np.ndarray, dtype: str) -> dict[str, Any]:
        """Copy ``arr`` (C-contiguous) into the tensor part; its descriptor."""
        off = aligned(self.cursor)
        np.copyto(self.segment.view(off, arr.nbytes), arr.reshape(-1).view(np.uint8))
        self.cursor = off + arr.nbytes
        return ShmTensor(self.segment.name, off, dtype, tuple(arr.shape)).descriptor()

    def space(self) -> ReplySpace:
        return ReplySpace(self.segment.name, self.reply_off, self.segment.size - self.reply_off)

    def read(self, ref: ShmTensor) -> np.ndarray:
        """An output the Worker placed in this call's segment, as a read-only view of it, no copy: the segment
        goes back to the pool only once every output of the call (and every view of one) is gone."""
        if ref.seg != self.segment.name:
            raise InvalidInput("shared memory output in a segment that is not this call's")
        dtype = np.dtype(ref.dtype)
        self.segment.view(ref.off, ref.nbytes)  # the bounds check
        if ref.off % dtype.alignment:
            out: np.ndarray = self.segment.array(ref).copy()  # a misaligned offset from a foreign server
        else:
            if self._owner is None:
                # one buffer object over the whole mapping owns every output's memory (numpy views keep it
                # alive); when the last view goes, its finalizer returns the segment (a ctypes array: a buffer
                # that takes weakrefs)
                owner = (ctypes.c_char * max(1, self.segment.size)).from_address(self.segment.base)
                owner._mmap = self.segment.mm  # type: ignore[attr-defined]  # the mapping lives while it does
                weakref.finalize(owner, self.pool.give_back, self)
                self._owner = owner
            out = np.frombuffer(self._owner, dtype=dtype, count=math.prod(ref.shape),
                                offset=ref.off).reshape(ref.shape)
        out.flags.writeable = False
        return out

    def finish(self, answered: bool) -> None:
        """The call is over: ``answered`` (a reply came, so no Worker writes the segment any more) gives the
        segment back for reuse, at once or, when outputs are views of it, once they are gone; otherwise it is
        unlinked and never reused. Only the first call counts."""
        if self.finished:
            return
        self.finished = True
        if not answered:
            self.pool.discard(self)
        elif self._owner is None:
            self.pool.give_back(self)
        self._owner = None  # the outputs hold it now; its finalizer gives the segment back


def remove_stale() -> None:
    """Remove the segments of Client processes that are gone without closing (killed): a name carries its
    creator's pid, and a segment whose process no longer exists is nobody's. Best effort; called when a pool is
    made."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return
    for name in names:
        if not NAME.fullmatch(name):
            continue
        pid = int(name[len(PREFIX):].split("-", 1)[0])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except OSError:
                pass
        except OSError:  # alive, but another user's
            pass


class SegmentPool:
    """A Client's segments: a call takes an idle one big enough (or a new one) and gives it back once answered.
    Thread-safe. `close` unlinks every segment, also those that outputs still use (their memory stays valid);
    the Client calls it on close and at interpreter exit."""

    def __init__(self) -> None:
        remove_stale()
        self._idle: list[Segment] = []
        self._names: set[str] = set()  # every segment not unlinked yet
        # re-entrant: a segment comes back from a finalizer, which the garbage collector may run anywhere
        self._lock = threading.RLock()
        self._closed = False

    def lease(self, tensor_bytes: int, reply_bytes: int) -> Lease:
        need = aligned(tensor_bytes) + aligned(reply_bytes)
        with self._lock:
            fits = [s for s in self._idle if s.size >= need]
            segment = min(fits, key=lambda s: s.size) if fits else None
            if segment is not None:
                self._idle.remove(segment)
        if segment is None:
            segment = Segment.create(max(need, MIN_BYTES))
            with self._lock:
                self._names.add(segment.name)
        return Lease(segment, aligned(tensor_bytes), self)

    def give_back(self, lease: Lease) -> None:
        """The call was answered: nobody writes the segment any more; keep it for reuse."""
        with self._lock:
            if not self._closed:
                self._idle.append(lease.segment)
                self._idle.sort(key=lambda s: s.size, reverse=True)
                drop = self._idle[IDLE_SEGMENTS:]
                del self._idle[IDLE_SEGMENTS:]
            else:
                drop = [lease.segment]
        for segment in drop:
            self._remove(segment)

    def discard(self, lease: Lease) -> None:
        """The call ended unanswered: a Worker may still write the segment; it is never reused."""
        self._remove(lease.segment)

    def _remove(self, segment: Segment) -> None:
        with self._lock:
            self._names.discard(segment.name)
        segment.unlink()
        segment.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            names, self._names = self._names, set()
        for segment in idle:
            segment.close()
        for name in names:
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except FileNotFoundError:
                pass


class Mapper:
    """A Worker's view of its clients' segments: maps each on first use and keeps the `MAPPED_SEGMENTS` most
    recent ones mapped (a segment its client unlinked stays valid while mapped; such mappings are dropped when
    the next new segment is mapped)."""

    def __init__(self, capacity: int = MAPPED_SEGMENTS) -> None:
        self.capacity = capacity
        self._mapped: OrderedDict[str, Segment] = OrderedDict()
        self._lock = threading.Lock()  # request threads map concurrently

    def segment(self, name: str) -> Segment:
        with self._lock:
            seg = self._mapped.get(name)
            if seg is not None:
                self._mapped.move_to_end(name)
                return seg
        seg = Segment.open(name)
        with self._lock:
            # a new client segment: drop the mappings of segments their clients removed (closed, or exited), so
            # their memory is freed now rather than when they fall off the end
            for gone in [n for n in self._mapped if not os.path.exists(os.path.join(SHM_DIR, n))]:
                self._mapped.pop(gone).close()
            self._mapped[name] = seg
            while len(self._mapped) > self.capacity:
                self._mapped.popitem(last=False)[1].close()
        return seg

    def array(self, ref: ShmTensor) -> np.ndarray:
        """The input tensor ``ref`` names, a read-only view (stages that mutate must copy, as for inline
        tensors)."""
        arr = self.segment(ref.seg).array(ref)
        arr.flags.writeable = False
        return arr

    def writer(self, space: ReplySpace | None) -> ReplyWriter | None:
        return None if space is None else ReplyWriter(self.segment(space.seg), space)


class ReplyWriter:
    """Places a request's large outputs in its reply space, in order; what does not fit travels inline."""

    def __init__(self, segment: Segment, space: ReplySpace) -> None:
        self.segment = segment
        self.cursor = space.off
        self.end = min(segment.size, space.off + space.size)

    def place(self, arr: np.ndarray, dtype: str) -> dict[str, Any] | None:
        """The descriptor of ``arr`` (C-contiguous, a wire ``dtype``) in the client's segment, or None."""
        if arr.nbytes < MIN_BYTES:
            return None
        address = arr.ctypes.data
        if self.segment.base <= address and address + arr.nbytes <= self.segment.base + self.segment.size:
            # a view of the client's own segment (an input passed through): name where it lies, no copy
            return ShmTensor(self.segment.name, address - self.segment.base, dtype, arr.shape).descriptor()
        off = aligned(self.cursor)
        if off + arr.nbytes > self.end:
            return None
        np.copyto(self.segment.bytes[off:off + arr.nbytes], arr.reshape(-1).view(np.uint8))
        self.cursor = off + arr.nbytes
        return ShmTensor(self.segment.name, off, dtype, arr.shape).descriptor()
