"""``servable_framework.server``: start servables and front ends in the Main process (contract §5).

Typical ``serving_server.py``::

    from servable_framework import server
    server.start_servables(server.ServableStartConfig(servable_dir, "add", device_ids=0))
    server.start_zmq_server("127.0.0.1:5500")
    server.start_restful_server("127.0.0.1:1500")

The calls return once the Workers are READY (or raise); Main then stays alive serving until SIGINT/SIGTERM
or `stop()`.
"""

from __future__ import annotations

from typing import Any

from servable_framework.main import master
from servable_framework.main.master import set_settings
from servable_framework.servable import checks
from servable_framework.servable.loader import check_servable_dir
from servable_framework.server import distributed, register
from servable_framework.server.start_config import DistributedStartConfig, ServableStartConfig
from servable_framework.settings import Settings
from servable_framework.tls import SSLConfig


def start_servables(servable_configs: Any, enable_lite: bool = False) -> None:
    """Start the Workers of one or several servables and block until all are ready.

    Args:
        servable_configs: a `ServableStartConfig` / `DistributedStartConfig`, or a list/tuple of them.
        enable_lite: accepted for compatibility; ignored.

    Raises:
        RuntimeError: a config is invalid, or a Worker failed to start (``Fail to start workers: <its error>``);
            Workers already started by this call are stopped first.
    """
    configs = list(servable_configs) if isinstance(servable_configs, (list, tuple)) else [servable_configs]
    if not configs:
        raise RuntimeError("Parameter 'servable_configs' should not be empty")
    directories: dict[str, str] = {}
    payloads: list[tuple[dict[str, Any], str]] = []
    waits: list[int] = []
    for cfg in configs:
        if not isinstance(cfg, (ServableStartConfig, DistributedStartConfig)):
            raise RuntimeError(f"The item of parameter 'servable_configs' should be ServableStartConfig, but "
                               f"actually {type(cfg)}")
        check_servable_dir(cfg.servable_directory, cfg.servable_name)
        if directories.setdefault(cfg.servable_name, cfg.servable_directory) != cfg.servable_directory:
            raise RuntimeError(f"The servable directory of servable name {cfg.servable_name} is different in "
                               f"multiple configurations")
        payloads.extend(_worker_payloads(cfg))
        if isinstance(cfg, DistributedStartConfig):
            waits.append(cfg.wait_agents_time_in_seconds)
    m = master.get_master()
    # a distributed servable bounds its own wait (wait_agents_time_in_seconds; 0 = forever)
    timeout = None if waits else m.settings.worker_start_timeout_s
    try:
        m.start_workers(payloads, timeout)
    except Exception:
        if not m.workers.workers and m.rest is None and m.zmq is None:
            m.stop()  # nothing else runs in this Main: do not keep the process alive after the error
        raise


def _worker_payloads(cfg: ServableStartConfig | DistributedStartConfig) -> list[tuple[dict[str, Any], str]]:
    base = {"servable_directory": cfg.servable_directory, "servable_name": cfg.servable_name,
            "version": cfg.version_number}
    if isinstance(cfg, DistributedStartConfig):
        dist = {"rank_table_json_file": cfg.rank_table_json_file, "distributed_address": cfg.distributed_address,
                "wait_agents_time_in_seconds": cfg.wait_agents_time_in_seconds}
        return [({**base, "device_id": None, "device_type": None, "distributed": dist},
                 f"log_{cfg.servable_name}_distributed.log")]
    count = max(len(cfg.device_ids), cfg.num_parallel_workers, 1)
    out = []
    for i in range(count):
        device = cfg.device_ids[i] if i < len(cfg.device_ids) else None
        name = f"device{device}" if device is not None else f"extra{i - len(cfg.device_ids)}"
        out.append(({**base, "device_id": device, "device_type": cfg.device_type, "distributed": None},
                    f"log_{cfg.servable_name}_{name}_version{cfg.version_number}.log"))
    return out


def start_restful_server(address: str, max_msg_mb_size: int = 100, ssl_config: Any = None) -> None:
    """Serve REST on ``"ip:port"`` (MindSpore's URL and JSON body; ``/health``, ``/ready``, ``/metrics``).

    Args:
        address: ``"ip:port"``; ``unix:`` addresses are rejected.
        max_msg_mb_size: largest accepted body in MB, 1-512 (413 above it).
        ssl_config: an `SSLConfig` to serve HTTPS (TLS >= 1.2; mutual TLS with ``verify_client=True``), or None.
    """
    checks.check_int("max_msg_mb_size", max_msg_mb_size, 1, 512)
    if ssl_config is not None and not isinstance(ssl_config, SSLConfig):
        raise RuntimeError("Parameter 'ssl_config' should be None or an SSLConfig")
    master.get_master().start_rest(address, max_msg_mb_size * 1024 * 1024, ssl_config)


def start_zmq_server(address: str, max_msg_mb_size: int = 100, ssl_config: Any = None) -> None:
    """Serve the binary ZMQ protocol (gRPC's place) on ``"ip:port"`` or ``"unix:path"``; see `client.Client`."""
    checks.check_int("max_msg_mb_size", max_msg_mb_size, 1, 512)
    if ssl_config is not None:
        raise RuntimeError("ssl_config is not supported on the ZMQ front end yet; use a TLS tunnel (or HTTPS REST)")
    master.get_master().start_zmq(address, max_msg_mb_size * 1024 * 1024)


start_grpc_server = start_zmq_server


def stop() -> None:
    """Drain and stop everything this process started (front ends, Workers). Idempotent."""
    master.stop()


__all__ = ["DistributedStartConfig", "SSLConfig", "ServableStartConfig", "Settings", "distributed", "register",
           "set_settings", "start_grpc_server", "start_restful_server", "start_servables", "start_zmq_server", "stop"]
