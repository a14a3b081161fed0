"""Thin pyzmq helpers: address parsing with MindSpore's messages, sockets with linger 0, framed send/recv."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Coroutine, Sequence
from typing import Any

import zmq
import zmq.asyncio

from servable_framework.wire import Frame, Kind, pack


def parse_address(address: str, tag: str, allow_unix: bool = True) -> tuple[str, int | None]:
    """``"ip:port"`` -> (ip, port); ``"unix:path"`` -> (path, None). Errors as in contract §5.3."""
    if not isinstance(address, str):
        raise RuntimeError(f"Parameter 'address' should be str, but actually {type(address)}")
    if address.startswith("unix:"):
        if not allow_unix:
            raise RuntimeError(f"{tag} does not support binding to unix domain socket")
        path = address[len("unix:"):]
        if not path:
            raise RuntimeError("Empty grpc server unix domain socket address")
        return path, None
    if ":" not in address:
        raise RuntimeError(f"The format of the {tag} address '{address}' is illegal")
    ip, _, port_text = address.rpartition(":")
    if not ip or not port_text:
        raise RuntimeError(f"Missing ip or port of the {tag} address '{address}'")
    if not port_text.isdigit():
        raise RuntimeError(f"The type of {tag} address '{address}' port is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise RuntimeError(f"The port of the {tag} address '{address}' is out of legal range [1 ~ 65535]")
    return ip, port


def valid_ip(ip: str) -> bool:
    if ip in ("localhost", "0.0.0.0", "*"):
        return True
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        return False
    return True


def zmq_endpoint(address: str, tag: str) -> str:
    host, port = parse_address(address, tag)
    return f"ipc://{host}" if port is None else f"tcp://{'*' if host == '0.0.0.0' else host}:{port}"


def async_socket(ctx: zmq.asyncio.Context, kind: int, identity: bytes | None = None,
                 max_msg_bytes: int | None = None) -> zmq.asyncio.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if max_msg_bytes is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, max_msg_bytes)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unknown/vanished peer raises instead of dropping silently
    return sock


async def send(sock: zmq.asyncio.Socket, kind: Kind, header: dict[str, Any], buffers: Sequence[Frame] = (),
               to: bytes | None = None) -> None:
    frames = pack(kind, header, buffers)
    await sock.send_multipart([to, *frames] if to is not None else frames, copy=False)


_background: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """``create_task`` that keeps a strong reference until the task ends (the loop itself only keeps a weak
    one, so an unreferenced task may be garbage-collected mid-flight)."""
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task
