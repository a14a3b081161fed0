"""Process lifecycle shared by Main, the Agent startup process and their children.

* `spawn` starts ``python -m <module>`` with a JSON payload in the environment (never pickled) and the
  read end of a *death pipe*: the child's `watch_parent` thread blocks on it and ends the child when it
  reads EOF, i.e. when the parent died for any reason, SIGKILL included. No polling.
* `terminate` is the one shutdown escalation: SIGTERM, wait up to ``grace_s``, then SIGKILL.
* A *standby* child (``spawn(..., payload=None)``) starts at once but reads its payload from a pipe, blocking
  until the parent calls `Child.give_payload`: it can import its heavy modules ahead of time and take over a
  job in well under a second instead of the seconds a fresh interpreter needs to import torch.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

PAYLOAD_ENV = "SERVABLE_FRAMEWORK_PAYLOAD"
PAYLOAD_FD_ENV = "SERVABLE_FRAMEWORK_PAYLOAD_FD"
DEATH_FD_ENV = "SERVABLE_FRAMEWORK_DEATH_FD"


class Child:
    """A spawned process plus the write end of its death pipe (closing it tells the child to go) and, for a
    standby, of its payload pipe."""

    def __init__(self, proc: subprocess.Popen[bytes], death_w: int, name: str, payload_w: int = -1) -> None:
        self.proc = proc
        self.death_w = death_w
        self.name = name
        self.payload_w = payload_w

    def give_payload(self, payload: dict[str, Any]) -> None:
        """Activate a standby child: write its payload (JSON) and close the pipe. Once only."""
        if self.payload_w < 0:
            raise RuntimeError(f"{self.name} is not a standby child, or already has its payload")
        data = json.dumps(payload).encode()
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.payload_w, view):]
        finally:
            os.close(self.payload_w)
            self.payload_w = -1

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close_pipe(self) -> None:
        if self.death_w >= 0:
            os.close(self.death_w)
            self.death_w = -1
        if self.payload_w >= 0:  # a standby never activated: EOF on its payload pipe ends it
            os.close(self.payload_w)
            self.payload_w = -1


def spawn(module: str, payload: dict[str, Any] | None, name: str, log_path: str | None = None,
          env: dict[str, str] | None = None, extra_fds: Iterable[int] = ()) -> Child:
    """Start ``python -m module``; stdout/stderr go to ``log_path`` (appended) or are inherited. ``payload``
    None: a standby child, whose `read_payload` waits for `Child.give_payload`."""
    death_r, death_w = os.pipe()
    os.set_inheritable(death_r, True)
    child_env = {**os.environ, **(env or {}), DEATH_FD_ENV: str(death_r)}
    fds = [death_r, *extra_fds]
    payload_w = -1
    if payload is None:
        payload_r, payload_w = os.pipe()
        child_env[PAYLOAD_FD_ENV] = str(payload_r)
        child_env.pop(PAYLOAD_ENV, None)
        fds.append(payload_r)
    else:
        child_env[PAYLOAD_ENV] = json.dumps(payload)
    child_env.setdefault("OMP_NUM_THREADS", "1")
    out = open(log_path, "ab") if log_path else None  # noqa: SIM115 - handed to the child, closed below
    try:
        proc = subprocess.Popen([sys.executable, "-m", module], env=child_env, stdout=out, stderr=out,
                                pass_fds=fds, start_new_session=True)
    finally:
        os.close(death_r)
        if payload is None:
            os.close(payload_r)
        if out is not None:
            out.close()
    log.info("started %s (pid %d)%s", name, proc.pid, f", log: {log_path}" if log_path else "")
    return Child(proc, death_w, name, payload_w)


def read_payload() -> dict[str, Any] | None:
    """In a child: the JSON payload its parent passed to `spawn`; a standby blocks here until the parent gives
    it (None: the parent closed the pipe without one, so there is nothing to do)."""
    if PAYLOAD_ENV in os.environ:
        data: dict[str, Any] = json.loads(os.environ[PAYLOAD_ENV])
        return data
    fd = int(os.environ[PAYLOAD_FD_ENV])
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return json.loads(b"".join(chunks)) if chunks else None


def watch_parent(on_death: Callable[[], object]) -> None:
    """In a child: call ``on_death`` (from a daemon thread) as soon as the parent process is gone."""
    fd = int(os.environ.get(DEATH_FD_ENV, "-1"))
    if fd < 0:
        return

    def wait() -> None:
        try:
            while os.read(fd, 1):  # the parent never writes: read returns b"" only at EOF (parent died)
                pass
        except OSError:
            pass
        log.warning("parent process is gone, exiting")
        on_death()

    threading.Thread(target=wait, name="watch-parent", daemon=True).start()


def terminate(children: Iterable[Child], grace_s: float = 10.0) -> None:
    """SIGTERM every live child, wait up to ``grace_s`` in total, then SIGKILL the rest. Idempotent.
    For threads without an event loop; on a loop use `aterminate` (the same escalation)."""
    import asyncio

    asyncio.run(aterminate(children, grace_s))


async def aterminate(children: Iterable[Child], grace_s: float = 10.0) -> None:
    """The one shutdown escalation: SIGTERM, wait up to ``grace_s`` in total, SIGKILL the rest. Never blocks
    the loop and needs no executor, so it also works while the interpreter is exiting."""
    import asyncio

    children = list(children)
    for child in children:
        child.close_pipe()
        if child.alive():
            _signal(child, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(c.alive() for c in children) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for child in children:
        if child.alive():
            log.warning("%s (pid %d) did not stop within %.0f s, killing it", child.name, child.pid, grace_s)
            _signal(child, signal.SIGKILL)
            child.proc.wait()


def _signal(child: Child, sig: int) -> None:
    try:
        os.kill(child.pid, sig)
    except ProcessLookupError:
        pass


def exit_now(code: int = 0) -> None:
    """Leave the process immediately (from any thread), flushing the standard streams first."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)
