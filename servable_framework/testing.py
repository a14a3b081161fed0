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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody uses right now, below the kernel's ephemeral range when it can: a port
    from that range (what ``bind(0)`` hands out) can be taken by any outgoing connection between this check and
    the server's own bind, which failed a CI run once ("bind to the socket address ... failed")."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    if low > 22000:
        for _ in range(200):
            port = random.randrange(21000, low)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
