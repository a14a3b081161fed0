"""Main <-> Worker link: `unixlink` (unix stream socket driven by the loop) vs ZMQ ``ipc://`` driven by
`transport.LoopSocket` (what the link was before), side by side in one run.

Two processes on uvloop: this one (the "Main" end: `unixlink.LinkServer` / a ROUTER) and an echo child (the
"Worker" end: `unixlink.LinkClient` / a DEALER) that sends every message straight back. Measured for each link:
ping-pong round trip p50 of a 300-byte message (``--calls``), then CPU per message of both processes with 8
messages in flight (this process from getrusage, the child from /proc: its I/O thread included), then the p50
round trip of one 64 MiB frame (``--big-calls``). Both ends use Main's malloc setting (`memtune`).

    .venv/bin/python bench/bench_link.py [--calls 20000] [--big-calls 10]

Writes bench/results/bench_link.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root

import numpy as np
import zmq

from bench._common import table, write_results
from servable_framework import memtune, transport, unixlink

SMALL = b"x" * 300
BIG = np.ones(16 * 2**20, dtype=np.float32)  # 64 MiB


async def echo(kind: str, path: str) -> None:
    """The child: echo every message until an empty one."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    if kind == "unix":
        def on_unix(frames: list[Any]) -> None:
            if len(frames[0]) == 0:
                done.set_result(None)
            client.send_frames(frames)
        client = unixlink.LinkClient(path, b"w0", on_unix)
        client.start()
        client.send_frames([b"hello"])
        await done
        await client.drain(5)
        client.stop()
        return
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"w0")  # as a Worker's DEALER had
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(f"ipc://{path}")

    def on_zmq(frames: list[Any]) -> None:
        if len(frames[0]) == 0:
            done.set_result(None)
        io.send_frames([f.buffer for f in frames])
    io = transport.LoopSocket(sock, on_zmq)
    io.start()
    io.send_frames([b"hello"])
    await done
    await io.drain(5)
    io.stop()


async def measure(kind: str, calls: int, big_calls: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    folder = tempfile.mkdtemp(prefix="bench_link-")
    path = os.path.join(folder, "s")
    inbox: asyncio.Queue[list[Any]] = asyncio.Queue()
    send: Callable[[list[Any]], None]
    if kind == "unix":
        server = unixlink.LinkServer(path, lambda ident, frames: inbox.put_nowait(frames))
        await server.start()
        send = lambda frames: server.send_frames(frames, to=b"w0")  # noqa: E731
    else:
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.bind(f"ipc://{path}")
        io = transport.LoopSocket(sock, lambda frames: inbox.put_nowait(frames[1:]))
        io.start()
        send = lambda frames: io.send_frames([b"w0", *frames])  # noqa: E731
    child = subprocess.Popen([sys.executable, __file__, "--echo", kind, path])
    await inbox.get()  # hello: the child is connected
    lat = []
    for i in range(calls + 200):
        t0 = time.perf_counter()
        send([SMALL])
        await inbox.get()
        if i >= 200:
            lat.append(time.perf_counter() - t0)
    own0, kid0, t0 = resource.getrusage(resource.RUSAGE_SELF), _cpu_s(child.pid), time.perf_counter()
    for _ in range(8):
        send([SMALL])
    for i in range(calls):
        await inbox.get()
        if i + 8 < calls:
            send([SMALL])
    wall = time.perf_counter() - t0
    own1, kid1 = resource.getrusage(resource.RUSAGE_SELF), _cpu_s(child.pid)
    big = []
    for i in range(big_calls + 1):
        t0 = time.perf_counter()
        send([BIG.data])
        frames = await inbox.get()
        if i >= 1:
            big.append(time.perf_counter() - t0)
        assert len(frames[0]) == BIG.nbytes
    send([b""])
    await inbox.get()
    await loop.run_in_executor(None, child.wait)
    if kind == "unix":
        server.stop()
    else:
        io.stop()
        sock.close(0)
    return {"rtt_p50_us": median(lat) * 1e6, "msgs_per_s_8_in_flight": calls / wall,
            "main_cpu_us_per_msg": (own1.ru_utime + own1.ru_stime - own0.ru_utime - own0.ru_stime) / calls * 1e6,
            "echo_cpu_us_per_msg": (kid1 - kid0) / calls * 1e6,
            "big_p50_ms": median(big) * 1e3}


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    if sys.argv[1:2] == ["--echo"]:
        memtune.keep_freed_memory(512)  # as a Worker
        transport.new_event_loop().run_until_complete(echo(sys.argv[2], sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--big-calls", type=int, default=10)
    a = ap.parse_args()
    memtune.keep_freed_memory(512)  # as Main
    res = {}
    for kind in ("zmq", "unix"):  # each in a fresh loop; the child is a fresh process
        res[kind] = transport.new_event_loop().run_until_complete(measure(kind, a.calls, a.big_calls))
        print(f"  {kind}: {res[kind]}", flush=True)
    rows = [[name, res["unix"][key], res["zmq"][key], res["unix"][key] / res["zmq"][key]]
            for name, key in [("300 B round trip p50 (us)", "rtt_p50_us"),
                              ("msgs/s, 8 in flight", "msgs_per_s_8_in_flight"),
                              ("Main-end CPU per msg (us)", "main_cpu_us_per_msg"),
                              ("echo-end CPU per msg (us)", "echo_cpu_us_per_msg"),
                              ("64 MiB round trip p50 (ms)", "big_p50_ms")]]
    print()
    print(table(["measure", "unixlink", "zmq ipc + LoopSocket", "ratio"], rows))
    print("ratio: unixlink / zmq, measured in this run")
    write_results("bench_link", {"settings": vars(a), "raw": res})


if __name__ == "__main__":
    main()
