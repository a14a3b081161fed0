"""Main: the process the user starts. Owns one asyncio loop (in a non-daemon thread, which keeps the
process alive after ``start_*`` return, like MindSpore's monitor thread) hosting the Worker control plane,
the dispatcher, the REST server (uvicorn) and the ZMQ front end.

Shutdown is one idempotent path (`Master.stop`): stop accepting, drain in-flight requests for up to
``graceful_timeout_s``, stop the front ends, tell Workers to exit (SIGTERM -> SIGKILL). SIGINT/SIGTERM on
Main run it; SIGKILL on Main is covered by the Workers' death pipes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvicorn
import zmq
import zmq.asyncio

from servable_framework import memtune, procs, transport
from servable_framework.curve import CurveKeys
from servable_framework.logs import setup_logging
from servable_framework.main import auth, http
from servable_framework.main.dispatcher import Dispatcher
from servable_framework.main.fast_http import ServingHttpProtocol
from servable_framework.main.rest import build_app
from servable_framework.main.workers import WorkerHandle, WorkerSet
from servable_framework.main.zmq_frontend import ZmqFrontend
from servable_framework.settings import Settings
from servable_framework.tls import CIPHERS, SSLConfig, server_context

log = logging.getLogger("servable_framework.main")
T = TypeVar("T")


class Master:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        memtune.keep_freed_memory(settings.keep_freed_mib)  # before this process's threads start
        self.loop = http.new_event_loop()  # uvloop when the REST server runs on it
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="serving-main", daemon=False)
        self.thread.start()
        self._ready.wait()
        self.ctx = zmq.asyncio.Context()
        self.workers: WorkerSet = self.call(self._make_workers())
        self.dispatcher = Dispatcher(self.workers, settings)
        self.rest: uvicorn.Server | None = None
        self.rest_task: asyncio.Task[None] | None = None
        self.zmq: ZmqFrontend | None = None
        self.stopped = False
        self._stop_lock = threading.Lock()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()
        self.loop.close()

    async def _make_workers(self) -> WorkerSet:
        workers = WorkerSet(self.settings)
        await workers.run()
        return workers

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on Main's loop from a user thread and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    # -- servables ------------------------------------------------------------------------------------------
    def start_workers(self, payloads: list[tuple[dict[str, Any], str]], timeout_s: float | None) -> None:
        async def start() -> None:
            handles: list[WorkerHandle] = [self.workers.spawn(p, name) for p, name in payloads]
            try:
                await self.workers.wait_started(handles, timeout_s)
            except Exception:
                for h in handles:  # on failure, stop what this call started
                    self.workers.workers.pop(h.worker_id, None)
                await procs.aterminate([h.child for h in handles if h.child], self.settings.graceful_timeout_s)
                raise

        self.call(start())

    # -- front ends -----------------------------------------------------------------------------------------
    def start_rest(self, address: str, max_msg_bytes: int, tls: SSLConfig | None = None) -> None:
        if self.rest is not None:
            raise RuntimeError("Serving Error: RESTful server is already running")
        if tls is not None:
            server_context(tls)  # the files are checked now, with the contract's errors; uvicorn loads them again
        api_keys = auth.load_keys(self.settings)  # a bad key file fails the start
        ip, port = transport.parse_address(address, "RESTful server", allow_unix=False)
        assert port is not None
        # proto must say TCP: asyncio sets TCP_NODELAY on accepted connections only then (else every
        # keep-alive response waits ~40 ms for the client's delayed ACK)
        sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            if not transport.valid_ip(ip):
                raise OSError(f"invalid ip {ip}")
            sock.bind((ip, port))
            sock.listen(2048)  # connections queue from now on, before uvicorn's loop picks the socket up
        except OSError:
            sock.close()
            raise RuntimeError(f"RESTful server start failed, bind to the socket address {address} failed") from None
        ssl_args: dict[str, Any] = {} if tls is None else {
            "ssl_certfile": tls.certificate, "ssl_keyfile": tls.private_key, "ssl_ca_certs": tls.custom_ca,
            "ssl_cert_reqs": ssl.CERT_REQUIRED if tls.verify_client else ssl.CERT_NONE, "ssl_ciphers": CIPHERS}
        auth.warn_if_exposed(ip, api_keys, tls is not None)
        # uvicorn's options, with its httptools protocol answering MindSpore's predict itself (`fast_http`)
        options = {**http.UVICORN_OPTIONS, **({"http": ServingHttpProtocol} if self.settings.http_direct else {})}
        config = uvicorn.Config(build_app(self.dispatcher, max_msg_bytes, api_keys), lifespan="off",
                                **options, **ssl_args)
        server = uvicorn.Server(config)
        self.rest = server

        async def serve() -> None:
            self.rest_task = asyncio.create_task(server.serve(sockets=[sock]))

        self.call(serve())
        log.info("Serving RESTful server start success, listening on %s%s%s", address, " (HTTPS)" if tls else "",
                 f", {len(api_keys)} API key(s) required" if api_keys else "")

    def start_zmq(self, address: str, max_msg_bytes: int, keys: CurveKeys | None = None) -> None:
        if self.zmq is not None:
            raise RuntimeError("Serving Error: Serving gRPC server is already running")
        host, port = transport.parse_address(address, "Serving gRPC")
        if port is not None and not transport.valid_ip(host):
            raise RuntimeError(f"Serving gRPC server start failed, create server failed, address {address}")

        async def make() -> ZmqFrontend:
            front = ZmqFrontend(self.ctx, address, self.dispatcher, max_msg_bytes, keys)
            front.run()
            # Clients on this host call over a unix socket next to the Workers' one (private 0700 folder); not
            # with CurveZMQ keys: there only a Client holding an authorized key may call, which a socket cannot ask
            if keys is None:
                await front.start_local(os.path.dirname(self.workers.address))
            return front

        try:
            self.zmq = self.call(make())
        except zmq.ZMQError:
            raise RuntimeError(f"Serving gRPC server start failed, create server failed, address {address}") from None
        log.info("Serving gRPC server start success, listening on %s%s", address,
                 " (CurveZMQ: authorized keys only)" if keys is not None else "")

    # -- stop -----------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Drain, stop front ends and Workers, end the loop thread. Safe to call more than once, from any thread."""
        with self._stop_lock:
            if self.stopped:
                return
            self.stopped = True
        if threading.current_thread() is self.thread:
            raise RuntimeError("stop() must not be called from Main's own loop thread")
        try:
            self.call(self._shutdown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=self.settings.graceful_timeout_s + 15)

    async def _shutdown(self) -> None:
        self.dispatcher.draining = True  # new requests get 503 from now on
        try:
            await asyncio.wait_for(self.dispatcher.idle.wait(), self.settings.graceful_timeout_s)
        except asyncio.TimeoutError:
            log.warning("%d requests still in flight after %.0f s, stopping anyway", self.dispatcher.inflight,
                        self.settings.graceful_timeout_s)
        if self.rest is not None:
            self.rest.should_exit = True
            if self.rest_task is not None:
                await asyncio.wait({self.rest_task}, timeout=5)
        if self.zmq is not None:
            self.zmq.close()
        await self.workers.stop()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        self.ctx.term()
        log.info("servable_framework Main stopped")


_master: Master | None = None
_master_lock = threading.Lock()
_settings: Settings | None = None


def set_settings(settings: Settings) -> None:
    global _settings
    if _master is not None:
        raise RuntimeError("settings must be set before the first start_* call")
    _settings = settings


def get_master() -> Master:
    """The process-wide Main, created on first use (installs SIGINT/SIGTERM handlers when on the main thread)."""
    global _master
    with _master_lock:
        if _master is None or _master.stopped:
            setup_logging("main")
            _master = Master(_settings or Settings.from_env())
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(sig, _on_signal)
            if sys.excepthook is not _stop_on_uncaught:
                _stop_on_uncaught.previous = sys.excepthook  # type: ignore[attr-defined]
                sys.excepthook = _stop_on_uncaught
        return _master


def _stop_on_uncaught(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
    """A start script that dies of an exception (a port in use, a refused start_* call after others succeeded)
    stops what it started, instead of living on in Main's non-daemon thread with half a deployment."""
    _stop_on_uncaught.previous(kind, exc, tb)  # type: ignore[attr-defined]
    if _master is not None and not _master.stopped:
        log.error("the start script failed (%s); stopping Main and its Workers", kind.__name__)
        stop()


def stop() -> None:
    if _master is not None:
        _master.stop()


def _on_signal(signum: int, _frame: Any) -> None:
    log.info("received %s, shutting down", signal.Signals(signum).name)
    # stop() joins the loop thread, which must not happen inside a signal handler that interrupted a
    # lock wait of that same join; run it on a helper thread and let the main thread return.
    threading.Thread(target=stop, name="serving-stop", daemon=False).start()
