"""Authenticated ZMQ links (CurveZMQ): the ZMQ front end and the Distributed Worker accept only peers that hold
a key, and every byte between them is encrypted.

A keys directory (``python -m servable_framework.keys create DIR``) holds::

    DIR/server.key          the servers' public key: every client (Agents, ZMQ Clients) needs it
    DIR/server.key_secret   the servers' key pair: Main (ZMQ front end) and the Distributed Worker only
    DIR/client.key_secret   a client key pair: Agents and ZMQ Clients
    DIR/authorized/*.key    the client public keys the servers accept (one file per client key pair)

Give it with ``keys_dir=DIR`` (`server.start_zmq_server`, `distributed.start_servable`,
`distributed.startup_agents`, `client.Client`) or ``SERVABLE_KEYS_DIR=DIR`` in the environment. Without keys the
links are plain ZMQ, which is allowed only while every listening address is loopback (127.0.0.0/8, ::1,
localhost or a ``unix:`` path): binding any other address without keys is a start error that names the command
above. A peer with no key, another key or a key not in ``authorized/`` is refused during the handshake (logged
by the server as a warning), and never reaches the framework's message handling.

Key files are ZeroMQ's own certificate format (``zmq.auth``), written with mode 0600 for secrets.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
import zmq.auth
import zmq.utils.z85

from servable_framework import transport
from servable_framework.errors import StartupError

log = logging.getLogger("servable_framework.curve")

ENV = "SERVABLE_KEYS_DIR"
ZAP_DOMAIN = b"servable_framework"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by the ZAP specification (RFC 27)
CREATE_HINT = "create keys with `python -m servable_framework.keys create DIR` and pass keys_dir=DIR (or set " \
              f"{ENV}=DIR) to the servers, the Agents and the Clients"


@dataclass(frozen=True)
class CurveKeys:
    """A keys directory (see the module docstring). Files are read when a socket is secured, so a missing file
    is reported for the role that needs it."""

    directory: Path

    def _file(self, name: str, role: str) -> Path:
        path = self.directory / name
        if not path.is_file():
            raise StartupError(f"{role} needs the key file {path}, which does not exist; {CREATE_HINT}")
        return path

    def server_pair(self) -> tuple[bytes, bytes]:
        public, secret = zmq.auth.load_certificate(self._file("server.key_secret", "a server"))
        assert secret is not None
        return public, secret

    def server_public(self) -> bytes:
        return zmq.auth.load_certificate(self._file("server.key", "a client"))[0]

    def client_pair(self) -> tuple[bytes, bytes]:
        public, secret = zmq.auth.load_certificate(self._file("client.key_secret", "a client"))
        assert secret is not None
        return public, secret

    def authorized(self) -> set[bytes]:
        """Public keys (z85) the servers accept."""
        folder = self.directory / "authorized"
        if not folder.is_dir():
            raise StartupError(f"a server needs the folder of authorized client keys {folder}; {CREATE_HINT}")
        return {zmq.auth.load_certificate(p)[0] for p in sorted(folder.glob("*.key"))}


def resolve(keys_dir: str | os.PathLike[str] | None) -> CurveKeys | None:
    """The keys to use: ``keys_dir`` if given, else ``$SERVABLE_KEYS_DIR``, else None (plain ZMQ)."""
    chosen = keys_dir if keys_dir is not None else os.environ.get(ENV) or None
    if chosen is None:
        return None
    path = Path(chosen)
    if not path.is_dir():
        raise StartupError(f"keys directory {path} does not exist; {CREATE_HINT}")
    return CurveKeys(path.resolve())


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (a ``unix:`` path counts: pass its path with port None)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_keys(address: str, keys: CurveKeys | None, what: str, tag: str) -> None:
    """A server (``what``) about to bind ``address`` (``"ip:port"`` or ``"unix:path"``; ``tag`` names it in
    address errors, as `transport.parse_address`): keys are required off loopback."""
    host, port = transport.parse_address(address, tag)
    if keys is None and port is not None and not is_loopback(host):
        raise StartupError(f"{what} would listen on {address}, which other machines can reach, without "
                           f"authentication: {CREATE_HINT}. (Plain links are allowed on loopback addresses only.)")


def require_client_keys(address: str, keys: CurveKeys | None, what: str) -> None:
    """A client (``what``) about to connect to a server at ``address``: off loopback that server requires keys
    (`require_keys`), so a client without them could only hang in the handshake; say so instead."""
    host, port = transport.parse_address(address, "distributed")
    if keys is None and port is not None and not is_loopback(host):
        raise StartupError(f"{what} connects to {address}, which is not a loopback address, so that server accepts "
                           f"authenticated peers only: {CREATE_HINT}")


def secure_server(sock: zmq.Socket[Any], keys: CurveKeys) -> None:
    """Make ``sock`` (before bind) a CURVE server; its peers are checked by the context's `ZapHandler`."""
    public, secret = keys.server_pair()
    sock.curve_server = True
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.zap_domain = ZAP_DOMAIN


def secure_client(sock: zmq.Socket[Any], keys: CurveKeys) -> None:
    """Make ``sock`` (before connect) a CURVE client of a server holding ``keys``' server key pair."""
    public, secret = keys.client_pair()
    sock.curve_serverkey = keys.server_public()
    sock.curve_publickey = public
    sock.curve_secretkey = secret


class ZapHandler:
    """The context's ZAP handler (RFC 27) on the asyncio loop: a CURVE peer passes only with an authorized
    public key; a refusal is logged with the peer's address. Non-CURVE requests (other domains) pass: libzmq
    asks only for sockets that set a ZAP domain, and only ours do, all of them CURVE servers."""

    def __init__(self, ctx: zmq.asyncio.Context, keys: CurveKeys) -> None:
        self.authorized = keys.authorized()
        self.refused = 0
        self.sock = ctx.socket(zmq.REP)
        self.sock.linger = 0
        self.sock.bind(ZAP_ENDPOINT)  # must exist before a CURVE socket accepts: libzmq would otherwise admit all
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            await self.sock.send_multipart(self.answer(frames))

    def answer(self, frames: list[bytes]) -> list[bytes]:
        """The ZAP reply to one request ``[version, id, domain, address, identity, mechanism, credentials...]``."""
        if len(frames) < 6:
            return [b"1.0", frames[1] if len(frames) > 1 else b"", b"400", b"malformed ZAP request", b"", b""]
        version, request_id, domain, address, _identity, mechanism = frames[:6]
        if version != b"1.0":
            return [b"1.0", request_id, b"400", b"bad ZAP version", b"", b""]
        if domain != ZAP_DOMAIN:
            return [b"1.0", request_id, b"200", b"OK", b"", b""]
        if mechanism == b"CURVE" and len(frames) == 7:
            key = zmq.utils.z85.encode(frames[6])
            if key in self.authorized:
                return [b"1.0", request_id, b"200", b"OK", key, b""]
            reason = f"its key {key.decode()} is not in authorized/"
        else:
            reason = f"it did not authenticate ({mechanism.decode(errors='replace') or 'no mechanism'})"
        self.refused += 1
        log.warning("refused a connection from %s: %s", address.decode(errors="replace"), reason)
        return [b"1.0", request_id, b"400", b"not authorized", b"", b""]

    def close(self) -> None:
        self._task.cancel()
        self.sock.close(0)


def watch_handshakes(sock: zmq.asyncio.Socket, what: str) -> asyncio.Task[None]:
    """Log peers that failed the CURVE handshake before ZAP (no key, or the wrong server key): libzmq drops them
    silently otherwise. Returns the watching task (cancel it before closing ``sock``)."""
    from zmq.utils.monitor import parse_monitor_message

    failed = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    monitor = sock.get_monitor_socket(failed)

    async def watch() -> None:
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                log.warning("%s refused a connection that failed the CURVE handshake (no key or the wrong server "
                            "key; event %s)", what, event["event"])
        finally:
            monitor.close(0)

    return asyncio.get_running_loop().create_task(watch())


def create(directory: str | os.PathLike[str], force: bool = False) -> Path:
    """Write a fresh keys directory (server pair, one client pair, ``authorized/client.key``); returns it."""
    path = Path(directory)
    if path.exists() and any(path.iterdir()) and not force:
        raise FileExistsError(f"{path} is not empty; pass --force to replace its keys")
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path) as tmp:
        for name in ("server", "client"):
            public, secret = zmq.auth.create_certificates(tmp, name)
            shutil.move(public, path / f"{name}.key")
            shutil.move(secret, path / f"{name}.key_secret")
            os.chmod(path / f"{name}.key_secret", 0o600)
    (path / "authorized").mkdir(exist_ok=True)
    shutil.copy(path / "client.key", path / "authorized" / "client.key")
    return path


def add_client(directory: str | os.PathLike[str], name: str) -> Path:
    """Create another client key pair ``DIR/clients/NAME.key_secret`` and authorize its public key; returns the
    secret file (hand it, with ``server.key``, to that client: a keys directory of its own)."""
    path = Path(directory)
    target = path / "clients" / name
    target.mkdir(parents=True, exist_ok=False)
    public, secret = zmq.auth.create_certificates(target, "client")
    os.chmod(secret, 0o600)
    shutil.copy(path / "server.key", target / "server.key")
    shutil.copy(public, path / "authorized" / f"{name}.key")
    return Path(secret)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m servable_framework.keys",
                                description="CurveZMQ keys for the ZMQ front end and the Agent links")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("create", help="write a keys directory: server pair, a client pair, authorized/")
    c.add_argument("directory")
    c.add_argument("--force", action="store_true", help="replace the keys of a non-empty directory")
    a = sub.add_parser("add-client", help="another client key pair in DIR/clients/NAME/ (a keys directory for that "
                                          "client), authorized by the servers that use DIR")
    a.add_argument("directory")
    a.add_argument("name")
    args = p.parse_args(argv)
    if args.command == "create":
        path = create(args.directory, args.force)
        print(f"wrote {path}/server.key[_secret], {path}/client.key[_secret], {path}/authorized/client.key")
    else:
        secret = add_client(args.directory, args.name)
        print(f"wrote {secret.parent}/ (give that folder to the client as its keys_dir) and authorized it")
