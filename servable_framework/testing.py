"""Helpers for starting a servable's processes for real in integration tests and benchmarks.

The project's own test suite and benchmarks use them; so can a user's tests of their servables. Each run
marks its children with an environment variable (``<name>=<session id>``, inherited by every descendant),
so `marked_pids` finds anything still running, even after it was re-parented to init.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
from pathlib import Path

_HANDED_OUT: set[int] = set()  # ports this process has handed out: a caller may not have bound them yet


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody uses right now and that this process has not handed out before, below
    the kernel's ephemeral range when it can. A port from that range (what ``bind(0)`` hands out) can be taken by
    any outgoing connection between this check and the server's own bind, which failed a CI run once ("bind to the
    socket address ... failed"); and a caller that asks for several ports before binding any (REST, ZMQ and the
    Distributed Worker's address) must not get the same one twice, which failed another."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    candidates = (random.randrange(21000, low) for _ in range(200)) if low > 22000 else iter(())
    for port in candidates:
        if port not in _HANDED_OUT and _bindable(port):
            _HANDED_OUT.add(port)
            return port
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free TCP port found on 127.0.0.1 in 400 tries")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def child_env(marker: str, session: str, repo: Path, **extra: str) -> dict[str, str]:
    """The environment for a child: this one, plus the session marker, ``repo`` on PYTHONPATH, one thread
    per process (torch on 2 cores; Agents too: ``SERVABLE_AGENT_THREADS=1`` instead of sharing the host's
    cores) and no model hub access; ``extra`` last."""
    env = {**os.environ, marker: session, "OMP_NUM_THREADS": "1", "SERVABLE_AGENT_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.update(extra)
    return env


def stop_popen(popen: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    """SIGTERM, wait up to ``grace_s`` for a clean exit (the process stops its own children), then SIGKILL."""
    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()


def marked_pids(marker: str, session: str) -> list[int]:
    """Live (non-zombie) processes, other than this one, whose environment carries ``marker=session``."""
    wanted = f"{marker}={session}".encode()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if wanted not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as st:
                if st.read().split(") ")[-1].startswith("Z"):
                    continue  # a zombie waiting for its parent's wait(): not running
            out.append(int(entry))
        except OSError:
            continue
    return out
