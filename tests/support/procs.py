"""Real processes for integration tests: free ports, readiness polls with deadlines, whole-tree teardown.

Every process a test starts carries ``SERVABLE_TEST_SESSION=<id>`` in its environment (children inherit it),
so `leftover_processes` finds anything the suite left running, even after re-parenting to init.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx

from servable_framework import testing
from servable_framework.testing import free_port

__all__ = ["free_port"]  # re-exported: tests import it from here

REPO = Path(__file__).resolve().parents[2]
SESSION_ID = os.environ.setdefault("SERVABLE_TEST_SESSION", uuid.uuid4().hex)
PYTHON = sys.executable


def child_env(**extra: str) -> dict[str, str]:
    # no standby Agent interpreters by default: each costs a torch import (seconds of CPU on 2 cores) per cluster;
    # the fault tests that measure recovery turn them on
    extra.setdefault("SERVABLE_AGENT_STANDBY", "0")
    return testing.child_env("SERVABLE_TEST_SESSION", SESSION_ID, REPO, **extra)


def session_pids() -> list[int]:
    """Live processes (other than pytest itself) whose environment carries this test session's marker."""
    return testing.marked_pids("SERVABLE_TEST_SESSION", SESSION_ID)


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


class Proc:
    """A started script. ``stop()`` ends it and every process of the test session it started."""

    def __init__(self, args: list[str], cwd: Path | str, name: str, log_dir: Path, env: dict[str, str] | None = None):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen([PYTHON, *args], cwd=cwd, env=env or child_env(), stdout=self._log,
                                      stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def wait(self, timeout_s: float) -> int:
        return self.popen.wait(timeout=timeout_s)

    def stop(self, grace_s: float = 15.0) -> None:
        testing.stop_popen(self.popen, grace_s)
        self._log.close()


def kill_session_leftovers() -> list[int]:
    """SIGKILL every process of this test session still running; returns their pids."""
    pids = session_pids()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


class Rest:
    """A tiny httpx wrapper bound to one server."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.base, timeout=60.0)

    def post(self, path: str, body: bytes | str | dict | None = None, **kw: object) -> httpx.Response:
        if isinstance(body, dict):
            return self.client.post(path, json=body, **kw)  # type: ignore[arg-type]
        return self.client.post(path, content=body, **kw)  # type: ignore[arg-type]

    def get(self, path: str) -> httpx.Response:
        return self.client.get(path)

    def is_ready(self) -> bool:
        try:
            return self.get("/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, server: Proc, timeout_s: float) -> None:
        def check() -> bool:
            if not server.alive():
                raise RuntimeError(f"{server.name} exited early (code {server.popen.returncode}):\n{server.log()}")
            return self.is_ready()

        wait_until(check, timeout_s, f"{server.name} /ready")

    def close(self) -> None:
        self.client.close()
