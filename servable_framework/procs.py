"""Process lifecycle shared by Main, the Agent startup process and their children.

* `spawn` starts ``python -m <module>`` with a JSON payload in the environment (never pickled) and the
  read end of a *death pipe*: the child's `watch_parent` thread blocks on it and ends the child when it
  reads EOF, i.e. when the parent died for any reason, SIGKILL included. No polling.
* `terminate` is the one shutdown escalation: SIGTERM, wait up to ``grace_s``, then SIGKILL.
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
DEATH_FD_ENV = "SERVABLE_FRAMEWORK_DEATH_FD"


class Child:
    """A spawned process plus the write end of its death pipe (closing it tells the child to go)."""

    def __init__(self, proc: subprocess.Popen[bytes], death_w: int, name: str) -> None:
        self.proc = proc
        self.death_w = death_w
        self.name = name

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close_pipe(self) -> None:
        if self.death_w >= 0:
            os.close(self.death_w)
            self.death_w = -1


def spawn(module: str, payload: dict[str, Any], name: str, log_path: str | None = None,
          env: dict[str, str] | None = None, extra_fds: Iterable[int] = ()) -> Child:
    """Start ``python -m module``; stdout/stderr go to ``log_path`` (appended) or are inherited."""
    death_r, death_w = os.pipe()
    os.set_inheritable(death_r, True)
    child_env = {**os.environ, **(env or {}), PAYLOAD_ENV: json.dumps(payload), DEATH_FD_ENV: str(death_r)}
    child_env.setdefault("OMP_NUM_THREADS", "1")
    out = open(log_path, "ab") if log_path else None  # noqa: SIM115 - handed to the child, closed below
    try:
        proc = subprocess.Popen([sys.executable, "-m", module], env=child_env, stdout=out, stderr=out,
                                pass_fds=(death_r, *extra_fds), start_new_session=True)
    finally:
        os.close(death_r)
        if out is not None:
            out.close()
    log.info("started %s (pid %d)%s", name, proc.pid, f", log: {log_path}" if log_path else "")
    return Child(proc, death_w, name)


def read_payload() -> dict[str, Any]:
    """In a child: the JSON payload its parent passed to `spawn`."""
    data: dict[str, Any] = json.loads(os.environ[PAYLOAD_ENV])
    return data


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
