"""Network namespaces as separate hosts for multi-host tests (Linux, root, iproute2's ``ip``).

`Network` builds one private network per test run::

    <run>-sw                 switch: bridge br0, one port p-<host> per host
    <run>-<host> (each host) lo up; eth0 (the veth peer of p-<host>) with the host's address, e.g. 10.77.0.11/24

Nothing is added to the root namespace (each veth pair is created directly inside its two namespaces), so the
traffic stays inside these namespaces and their loopbacks. Runs side by side never clash: the names carry the
creating process's pid and a random token, and every run may use the same private subnet because each run's
network is its own. Deleting the namespaces deletes the bridge and the veth pairs with them; `Network.destroy`
first kills any process still inside them (started by this run: nothing else can enter them).

`NetnsProc` starts a test script on a host (``ip netns exec``); `NetnsRest` sends REST requests from inside a
host (every request runs on one thread that entered the namespace with setns(2)).
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tests.support.procs import PYTHON, Proc, Rest, child_env

NETNS_DIR = Path("/run/netns")
PREFIX = "sfmh"  # every namespace of these tests: sfmh<pid>x<token>-<host>
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def _ip(*args: str) -> None:
    """Run ``ip ARGS``; a failure raises with ip's own message."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {done.stderr.strip() or done.stdout.strip()}")


def unavailable() -> str | None:
    """Why network namespaces cannot be made here (the reason to skip), or None when they can: tries one."""
    if os.name != "posix" or not Path("/proc/self/ns/net").exists():
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (run the tests as root, as CI does)"
    if shutil.which("ip") is None:
        return "no `ip` command (install iproute2)"
    probe = f"{PREFIX}{os.getpid()}x{secrets.token_hex(3)}-probe"
    try:
        _ip("netns", "add", probe)
        _ip("-n", probe, "link", "add", "br0", "type", "bridge")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace with a bridge: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


def netns_inode(name: str) -> int:
    return os.stat(NETNS_DIR / name).st_ino


def pids_in(name: str) -> list[int]:
    """Processes whose network namespace is ``name``."""
    try:
        wanted = netns_inode(name)
    except OSError:
        return []
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino == wanted:
                    out.append(int(entry))
            except OSError:
                continue
    return out


def remove_stale() -> list[str]:
    """Delete the namespaces of earlier runs whose creating process is gone (a run killed before its teardown);
    returns their names. Namespaces of live runs are left alone."""
    removed = []
    for path in NETNS_DIR.glob(f"{PREFIX}*x*-*") if NETNS_DIR.is_dir() else ():
        pid = path.name[len(PREFIX):].split("x", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists() and not pids_in(path.name):
            subprocess.run(["ip", "netns", "del", path.name], capture_output=True, timeout=30)
            removed.append(path.name)
    return removed


class Network:
    """Hosts (name -> address) on one private /24, each in its own namespace, joined by a bridge."""

    def __init__(self, hosts: dict[str, str], prefix_len: int = 24) -> None:
        for host in hosts:
            if not host.isalnum() or len(host) > 12:  # p-<host> must fit an interface name (15 characters)
                raise ValueError(f"host name {host!r}: letters and digits, at most 12")
        self.hosts = dict(hosts)
        self.prefix_len = prefix_len
        self.run_id = f"{PREFIX}{os.getpid()}x{secrets.token_hex(3)}"
        self.switch = f"{self.run_id}-sw"
        self.created: list[str] = []
        self._next_port = 20000

    def ns(self, host: str) -> str:
        return f"{self.run_id}-{host}"

    def ip(self, host: str) -> str:
        return self.hosts[host]

    def port(self) -> int:
        """A port no earlier call of this run handed out. Every namespace starts with nothing listening, so it is
        free on every host; one counter keeps servers of consecutive clusters apart (no TIME_WAIT surprises)."""
        self._next_port += 1
        return self._next_port

    def _add(self, name: str) -> None:
        _ip("netns", "add", name)
        self.created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def create(self) -> None:
        """Build the switch and the hosts. On failure, what was made is removed again and the error raised."""
        try:
            self._add(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for host, address in self.hosts.items():
                ns, port = self.ns(host), f"p-{host}"
                self._add(ns)
                _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", self.switch)
                _ip("-n", self.switch, "link", "set", port, "master", "br0")
                _ip("-n", self.switch, "link", "set", port, "up")
                _ip("-n", ns, "addr", "add", f"{address}/{self.prefix_len}", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
        except BaseException:
            self.destroy()
            raise

    def pids(self, host: str) -> list[int]:
        return pids_in(self.ns(host))

    def destroy(self) -> list[int]:
        """Kill whatever still runs in these namespaces (SIGKILL, by pid), then delete them (with the bridge and
        the veth pairs). Returns the pids it had to kill. Idempotent."""
        killed = []
        for name in self.created:
            for pid in pids_in(name):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
        errors = []
        for name in reversed(self.created):
            done = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True, timeout=30)
            if done.returncode != 0 and (NETNS_DIR / name).exists():
                errors.append(f"{name}: {done.stderr.strip()}")
        self.created.clear()
        if errors:
            raise RuntimeError(f"could not delete network namespaces: {'; '.join(errors)}")
        return killed

    def exists(self) -> list[str]:
        """The namespaces of this run that still exist (empty after `destroy`)."""
        return sorted(p.name for p in NETNS_DIR.glob(f"{self.run_id}-*")) if NETNS_DIR.is_dir() else []

    def run(self, host: str, args: list[str], timeout_s: float = 120, env: dict[str, str] | None = None,
            cwd: Path | str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``python ARGS`` on ``host`` to completion (output captured)."""
        return subprocess.run(["ip", "netns", "exec", self.ns(host), PYTHON, *args], capture_output=True, text=True,
                              timeout=timeout_s, env=env or child_env(), cwd=cwd)


@contextmanager
def network(hosts: dict[str, str]) -> Iterator[Network]:
    """A created `Network`, destroyed on the way out whatever happens."""
    net = Network(hosts)
    net.create()
    try:
        yield net
    finally:
        net.destroy()


class NetnsProc(Proc):
    """`Proc` started on a host: ``ip netns exec NS python ARGS`` (ip execs the command: the pid is Python's)."""

    def __init__(self, net: Network, host: str, args: list[str], cwd: Path | str, name: str, log_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.host = host
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(["ip", "netns", "exec", net.ns(host), PYTHON, *args], cwd=cwd,
                                      env=env or child_env(), stdout=self._log, stderr=subprocess.STDOUT)


def enter(name: str) -> None:
    """Move the calling thread into network namespace ``name`` (sockets it opens from now on live there)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_DIR / name, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({name}): {os.strerror(errno)}")
    finally:
        os.close(fd)


class NetnsRest(Rest):
    """`Rest` whose requests leave from inside ``host``: every call runs on one thread that entered its namespace,
    so the client's connections are that host's (``127.0.0.1`` is the host's own loopback)."""

    def __init__(self, net: Network, host: str, port: int) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"rest-{host}", initializer=enter,
                                          initargs=(net.ns(host),))
        super().__init__(port)

    def _inside(self, call: Callable[..., T], *args: Any, **kw: Any) -> T:
        return self._thread.submit(call, *args, **kw).result()

    def post(self, path: str, body: bytes | str | dict | None = None, **kw: object) -> httpx.Response:
        return self._inside(super().post, path, body, **kw)

    def get(self, path: str) -> httpx.Response:
        return self._inside(super().get, path)

    def close(self) -> None:
        self._inside(super().close)
        self._thread.shutdown()


def listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket listening in the network namespace of process ``pid`` (from its
    /proc/PID/net/tcp and tcp6)."""
    import ipaddress

    out = []
    for fields in _tcp_rows(pid):
        if len(fields) < 4 or fields[3] != "0A":  # 0A: LISTEN
            continue
        hex_addr, hex_port = fields[1].split(":")
        raw = bytes.fromhex(hex_addr)
        # the kernel prints each 32-bit word in host (little-endian) order
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
        out.append((str(ipaddress.ip_address(raw)), int(hex_port, 16)))
    return out


def _tcp_rows(pid: int) -> Iterator[list[str]]:
    """The fields of every row of /proc/PID/net/tcp and tcp6 (the header lines skipped)."""
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            yield line.split()


def _proc_address(hex_addr: str) -> str:
    """An address as /proc/net/tcp{,6} prints it (each 32-bit word in host, little-endian, order), IPv4-mapped
    IPv6 addresses shown as IPv4."""
    import ipaddress

    raw = bytes.fromhex(hex_addr)
    address = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def connections(pid: int) -> list[tuple[tuple[str, int], tuple[str, int]]]:
    """((local address, port), (remote address, port)) of every established TCP connection whose socket process
    ``pid`` holds open (its /proc/PID/fd matched against its namespace's /proc/PID/net/tcp and tcp6), so other
    processes of the same namespace do not count."""
    own = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                own.add(target[len("socket:["):-1])
    except OSError:
        return []
    out = []
    for fields in _tcp_rows(pid):
        if len(fields) < 10 or fields[3] != "01" or fields[9] not in own:  # 01: ESTABLISHED; 9: inode
            continue
        (local, local_port), (remote, remote_port) = (f.split(":") for f in fields[1:3])
        out.append(((_proc_address(local), int(local_port, 16)), (_proc_address(remote), int(remote_port, 16))))
    return out
