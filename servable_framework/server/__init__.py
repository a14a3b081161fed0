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

import copy
from typing import Any

from servable_framework import crypto, curve
from servable_framework.main import master
from servable_framework.main.master import set_settings
from servable_framework.servable import checks
from servable_framework.servable.loader import check_servable_dir, newest_version
from servable_framework.server import distributed, register
from servable_framework.server.start_config import DistributedStartConfig, ServableStartConfig
from servable_framework.settings import Settings
from servable_framework.tls import SSLConfig


def start_servables(servable_configs: Any, enable_lite: bool = False, *, allow_reuse_device: bool = True) -> None:
    """Start the Workers of one or several servables and block until all are ready.

    Configs of one servable are merged as in MindSpore (contract §5.2): version 0 is resolved to the newest
    version first, then configs of the same version become one (device ids unioned, ``num_parallel_workers``
    the largest; their ``dec_key``/``dec_mode`` must be equal). So ``version_number=0`` and the explicit newest
    version on one device start ONE Worker there. Different versions stay separate.

    Args:
        servable_configs: a `ServableStartConfig` / `DistributedStartConfig`, or a list/tuple of them.
        enable_lite: accepted for compatibility; ignored.
        allow_reuse_device: True (the default, as MindSpore on GPU/CPU): Workers of different servables or
            versions may share a device id. False: a CUDA device id may be held by one Worker of this Main only
            (each Worker holds its own copy of the weights and they contend for the device); CPU ids are always
            shareable (they name no exclusive resource).

    Raises:
        RuntimeError: a config is invalid or the configs conflict, or a Worker failed to start (``Fail to start
            workers: <its error>``); Workers already started by this call are stopped first.
    """
    configs = list(servable_configs) if isinstance(servable_configs, (list, tuple)) else [servable_configs]
    if not configs:
        raise RuntimeError("Parameter 'servable_configs' should not be empty")
    directories: dict[str, str] = {}
    for cfg in configs:
        if not isinstance(cfg, (ServableStartConfig, DistributedStartConfig)):
            raise RuntimeError(f"The item of parameter 'servable_configs' should be ServableStartConfig, but "
                               f"actually {type(cfg)}")
        check_servable_dir(cfg.servable_directory, cfg.servable_name)
        if directories.setdefault(cfg.servable_name, cfg.servable_directory) != cfg.servable_directory:
            raise RuntimeError(f"The servable directory of servable name {cfg.servable_name} is different in "
                               f"multiple configurations")
    local = merge_configs([c for c in configs if isinstance(c, ServableStartConfig)])
    distributed_configs = [c for c in configs if isinstance(c, DistributedStartConfig)]
    m = master.get_master()
    if not allow_reuse_device:
        _check_exclusive_devices(local, [h.payload for h in m.workers.workers.values()])
    payloads: list[tuple[dict[str, Any], str]] = []
    ordered: list[ServableStartConfig | DistributedStartConfig] = [*local, *distributed_configs]
    for cfg in ordered:
        payloads.extend(_worker_payloads(cfg))
    waits = [c.wait_agents_time_in_seconds for c in distributed_configs]
    # a distributed servable bounds its own wait (wait_agents_time_in_seconds; 0 = forever)
    timeout = None if waits else m.settings.worker_start_timeout_s
    try:
        m.start_workers(payloads, timeout)
    except Exception:
        if not m.workers.workers and m.rest is None and m.zmq is None:
            m.stop()  # nothing else runs in this Main: do not keep the process alive after the error
        raise


def merge_configs(configs: list[ServableStartConfig]) -> list[ServableStartConfig]:
    """One config per (servable, version): version 0 resolved to the newest version directory (kept 0 when there
    is none: the Worker reports that), device ids unioned in order, ``num_parallel_workers`` the largest. Returns
    new objects; the given ones are not changed."""
    merged: dict[tuple[str, int], ServableStartConfig] = {}
    for cfg in configs:
        version = cfg.version_number or newest_version(cfg.servable_directory, cfg.servable_name)
        into = merged.get((cfg.servable_name, version))
        if into is None:
            into = merged[(cfg.servable_name, version)] = copy.copy(cfg)
            into.version_number, into.device_ids = version, list(cfg.device_ids)
            continue
        if into.decryption != cfg.decryption:  # the mode matters only with a key
            raise RuntimeError(f"The dec key or dec mode of servable name {cfg.servable_name} is different in "
                               f"multiple configurations.")
        if into.device_type != cfg.device_type:
            raise RuntimeError(f"The device type of servable name {cfg.servable_name} is different in multiple "
                               f"configurations of version {version}")
        into.device_ids += [d for d in cfg.device_ids if d not in into.device_ids]
        into.num_parallel_workers = max(into.num_parallel_workers, cfg.num_parallel_workers)
    return list(merged.values())


def _check_exclusive_devices(configs: list[ServableStartConfig], running: list[dict[str, Any]]) -> None:
    """``allow_reuse_device=False``: each CUDA device id at most once over the new and this Main's running Workers."""
    import torch

    def on_cuda(device_type: str | None) -> bool:
        return device_type in (None, "gpu") and torch.cuda.is_available()  # the Worker's own rule

    used = {p["device_id"] for p in running if p.get("device_id") is not None and on_cuda(p.get("device_type"))}
    for cfg in configs:
        if not on_cuda(cfg.device_type):
            continue
        for device_id in cfg.device_ids:
            if device_id in used:
                raise RuntimeError(f"GPU device id {device_id} is used repeatedly in servable {cfg.servable_name}")
            used.add(device_id)


def _worker_payloads(cfg: ServableStartConfig | DistributedStartConfig) -> list[tuple[dict[str, Any], str]]:
    base = {"servable_directory": cfg.servable_directory, "servable_name": cfg.servable_name,
            "version": cfg.version_number}
    if isinstance(cfg, DistributedStartConfig):
        dist = {"rank_table_json_file": cfg.rank_table_json_file, "distributed_address": cfg.distributed_address,
                "wait_agents_time_in_seconds": cfg.wait_agents_time_in_seconds, "keys_dir": cfg.keys_dir}
        return [({**base, "device_id": None, "device_type": None, "distributed": dist},
                 f"log_{cfg.servable_name}_distributed.log")]
    if cfg.decryption is not None:  # a `crypto.Secret` in the payload: redacted in any repr of it
        base[crypto.PAYLOAD_FIELD] = cfg.decryption.to_payload()
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


def start_zmq_server(address: str, max_msg_mb_size: int = 100, ssl_config: Any = None, *,
                     keys_dir: str | None = None) -> None:
    """Serve the binary ZMQ protocol (gRPC's place) on ``"ip:port"`` or ``"unix:path"``; see `client.Client`.

    ``keys_dir`` (default ``$SERVABLE_KEYS_DIR``): CurveZMQ keys (`servable_framework.curve`); only Clients with
    an authorized key get through. Required when ``address`` is not loopback (or ``unix:``): a start error
    otherwise, naming the command that creates keys."""
    checks.check_int("max_msg_mb_size", max_msg_mb_size, 1, 512)
    if ssl_config is not None:
        raise RuntimeError("ssl_config is not supported on the ZMQ front end; CurveZMQ (keys_dir) authenticates "
                           "and encrypts it")
    master.get_master().start_zmq(address, max_msg_mb_size * 1024 * 1024, curve.resolve(keys_dir))


start_grpc_server = start_zmq_server


def stop() -> None:
    """Drain and stop everything this process started (front ends, Workers). Idempotent."""
    master.stop()


__all__ = ["DistributedStartConfig", "SSLConfig", "ServableStartConfig", "Settings", "distributed", "register",
           "set_settings", "start_grpc_server", "start_restful_server", "start_servables", "start_zmq_server", "stop"]
