"""`unixlink`: Main <-> Worker messages over a real unix socket on a real (uv)loop.

Frames of every size class (empty, small, just under and at the direct-receive size, megabytes) must arrive
whole, in order, with their bytes unchanged, however the stream is cut into reads; a peer that is gone or never
came must raise `LinkError` on send; a broken peer is dropped without stopping the server."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from servable_framework import transport, unixlink
from servable_framework.wire import Kind, unpack


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    loop = transport.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, 30))
    finally:
        loop.close()


async def wait_for(predicate: Any, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def test_frames_of_every_size_arrive_whole_and_in_order(tmp_path: Path) -> None:
    rng = random.Random(7)
    sizes = [0, 1, 300, unixlink.DIRECT_BYTES - 1, unixlink.DIRECT_BYTES, unixlink.DIRECT_BYTES + 1,
             unixlink.STAGING_BYTES + 3, 5 * 2**20]
    messages = [[bytes(rng.getrandbits(8) for _ in range(min(s, 64))) * (s // 64) + os.urandom(s % 64)
                 for s in rng.sample(sizes, rng.randint(1, 4))] for _ in range(60)]

    async def main() -> None:
        got: list[tuple[bytes, list[bytes]]] = []
        server = unixlink.LinkServer(str(tmp_path / "s"), lambda ident, frames: got.append(
            (ident, [bytes(f) for f in frames])))
        await server.start()
        back: list[list[bytes]] = []
        client = unixlink.LinkClient(str(tmp_path / "s"), b"w7", lambda frames: back.append([bytes(f) for f in frames]))
        for frames in messages[:5]:  # sent before the connection is up: queued, in order
            client.send_frames(frames)
        client.start()
        for frames in messages[5:]:
            client.send_frames(frames)
        await wait_for(lambda: len(got) == len(messages))
        assert got == [(b"w7", frames) for frames in messages]
        for frames in messages:  # and the other way, addressed by identity
            server.send_frames(frames, to=b"w7")
        await wait_for(lambda: len(back) == len(messages))
        assert back == messages
        client.stop()
        server.stop()

    run(main())


def test_large_frames_are_read_only_buffers_and_messages_round_trip(tmp_path: Path) -> None:
    async def main() -> None:
        got: list[Any] = []
        server = unixlink.LinkServer(str(tmp_path / "s"), lambda ident, frames: got.append(unpack(frames)))
        await server.start()
        client = unixlink.LinkClient(str(tmp_path / "s"), b"w0", lambda frames: None)
        client.start()
        x = np.arange(2**20, dtype=np.float32)
        client.send(Kind.RESULT, {"id": 3}, [x.view(np.uint8).data])
        client.send(Kind.RESULT, {"id": 4}, [x.data, b"tail"])  # a float32 memoryview: sized in bytes, not items
        await wait_for(lambda: len(got) == 2)
        kind, header, buffers = got[0]
        assert kind is Kind.RESULT and header["id"] == 3
        y = np.frombuffer(buffers[0], dtype=np.float32)
        assert np.array_equal(x, y) and not y.flags.writeable
        _, header, buffers = got[1]
        assert header["id"] == 4 and np.array_equal(np.frombuffer(buffers[0], dtype=np.float32), x)
        assert bytes(buffers[1]) == b"tail"
        assert await client.drain(5.0)
        client.stop()
        server.stop()

    run(main())


def test_sending_to_a_peer_that_is_not_connected_raises(tmp_path: Path) -> None:
    async def main() -> None:
        got: list[bytes] = []
        server = unixlink.LinkServer(str(tmp_path / "s"), lambda ident, frames: got.append(ident))
        await server.start()
        with pytest.raises(unixlink.LinkError, match="w1 is not connected"):
            server.send_frames([b"x"], to=b"w1")
        client = unixlink.LinkClient(str(tmp_path / "s"), b"w1", lambda frames: None)
        client.start()
        client.send_frames([b"hello"])
        await wait_for(lambda: got == [b"w1"])
        server.send_frames([b"x"], to=b"w1")
        client.stop()  # the Worker goes: its identity is unknown again
        await wait_for(lambda: b"w1" not in server.peers)
        with pytest.raises(unixlink.LinkError):
            server.send_frames([b"x"], to=b"w1")
        # a restarted Worker connects under the same identity and is reachable again, before it says anything
        again: list[bytes] = []
        client2 = unixlink.LinkClient(str(tmp_path / "s"), b"w1", lambda frames: again.append(bytes(frames[0])))
        client2.start()
        await wait_for(lambda: b"w1" in server.peers)
        server.send_frames([b"back"], to=b"w1")
        await wait_for(lambda: again == [b"back"])
        assert got == [b"w1"]  # the identity is not a message
        server.stop()  # Main goes: the client sees its connection end
        await asyncio.wait_for(client2.lost.wait(), 5)
        client2.stop()

    run(main())


def test_a_broken_peer_is_dropped_and_the_server_keeps_serving(tmp_path: Path) -> None:
    async def main() -> None:
        got: list[bytes] = []
        path = str(tmp_path / "s")
        server = unixlink.LinkServer(path, lambda ident, frames: got.append(bytes(frames[0])))
        await server.start()
        bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bad.connect(path)
        bad.sendall(struct.pack("<I", 0))  # a message of zero frames: not something our processes send
        loop = asyncio.get_running_loop()
        bad.setblocking(False)
        closed = await asyncio.wait_for(loop.sock_recv(bad, 1), 5)  # the server closes it: EOF
        assert closed == b""
        bad.close()
        client = unixlink.LinkClient(path, b"w2", lambda frames: None)
        client.start()
        client.send_frames([b"still here"])
        await wait_for(lambda: got == [b"still here"])
        client.stop()
        server.stop()

    run(main())


def test_a_worker_cannot_connect_when_main_is_not_there(tmp_path: Path) -> None:
    async def main() -> None:
        client = unixlink.LinkClient(str(tmp_path / "nobody"), b"w3", lambda frames: None)
        client.start()
        await asyncio.wait_for(client.lost.wait(), 5)
        assert not await client.drain(0.05)

    run(main())


def test_messages_sent_just_before_stop_are_written(tmp_path: Path) -> None:
    """Sends of one loop turn are written at its end; a `stop` in the same turn must write them first (a
    Worker's last message to Main goes out just before it closes its link)."""

    async def main() -> None:
        got: list[bytes] = []
        server = unixlink.LinkServer(str(tmp_path / "s"), lambda ident, frames: got.append(bytes(frames[0])))
        await server.start()
        client = unixlink.LinkClient(str(tmp_path / "s"), b"w1", lambda frames: None)
        client.start()
        await wait_for(lambda: b"w1" in server.peers)
        for i in range(3):
            client.send_frames([b"last %d" % i])
        assert await client.drain(5)  # drain waits for the turn's messages too
        client.send_frames([b"and one more"])
        client.stop()
        await wait_for(lambda: len(got) == 4)
        assert got == [b"last 0", b"last 1", b"last 2", b"and one more"]
        server.stop()

    run(main())
