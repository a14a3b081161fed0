"""`ServableStartConfig` and `DistributedStartConfig` (contract §5.1, §6.1), validated at construction."""

from __future__ import annotations

import os
import sys

from servable_framework import crypto, curve
from servable_framework.servable import checks


def resolve_path(path: str) -> str:
    """Relative paths are relative to the launching script's directory (``sys.argv[0]``), as in MindSpore."""
    if os.path.isabs(path):
        return path
    base = os.path.dirname(os.path.realpath(sys.argv[0])) if sys.argv and sys.argv[0] else os.getcwd()
    return os.path.join(base, path)


class ServableStartConfig:
    """What to start for one local servable.

    Args:
        servable_directory: folder holding ``{servable_name}/servable_config.py`` (relative: to the script's folder).
        servable_name: the servable's folder name.
        device_ids: int or list of ints: one Worker per device (CUDA index on GPU; on CPU a Worker per id).
            None: one Worker without a device (CPU).
        version_number: version folder to load; 0 = the newest.
        device_type: None, "CPU" or "GPU" (case ignored); None picks CUDA when available and ids are given.
        num_parallel_workers: total Workers = max(len(device_ids), num_parallel_workers), in [0, 64].
        dec_key, dec_mode: the key (bytes of length 16, 24 or 32) and mode ("AES-GCM" or "AES-CBC") of an
            encrypted model (`servable_framework.crypto`); the Workers decrypt it in memory. Never shown by
            repr, logs or errors.
    """

    def __init__(self, servable_directory: str, servable_name: str, device_ids: int | list[int] | None = None,
                 version_number: int = 0, device_type: str | None = None, num_parallel_workers: int = 0,
                 dec_key: bytes | None = None, dec_mode: str = "AES-GCM") -> None:
        self.servable_directory = resolve_path(checks.check_str("servable_directory", servable_directory))
        self.servable_name = checks.check_str("servable_name", servable_name)
        self.device_ids = [] if device_ids is None else checks.check_int_list("device_ids", device_ids)
        self.version_number = checks.check_int("version_number", version_number, 0)
        self.device_type = _device_type(device_type)
        self.num_parallel_workers = checks.check_int("num_parallel_workers", num_parallel_workers, 0, 64)
        self.decryption = crypto.check_key(dec_key, dec_mode)
        self.dec_mode = dec_mode

    def __repr__(self) -> str:
        key = "None" if self.decryption is None else "<redacted>"
        return (f"ServableStartConfig(servable_directory={self.servable_directory!r}, "
                f"servable_name={self.servable_name!r}, device_ids={self.device_ids!r}, "
                f"version_number={self.version_number}, device_type={self.device_type!r}, "
                f"num_parallel_workers={self.num_parallel_workers}, dec_key={key}, dec_mode={self.dec_mode!r})")


class DistributedStartConfig:
    """What `distributed.start_servable` starts: one Distributed Worker driving the Agents of a rank table."""

    def __init__(self, servable_directory: str, servable_name: str, rank_table_json_file: str, version_number: int,
                 distributed_address: str, wait_agents_time_in_seconds: int, keys_dir: str | None = None) -> None:
        self.servable_directory = resolve_path(checks.check_str("servable_directory", servable_directory))
        self.servable_name = checks.check_str("servable_name", servable_name)
        self.rank_table_json_file = resolve_path(checks.check_str("rank_table_json_file", rank_table_json_file))
        self.version_number = checks.check_int("version_number", version_number, 0) or 1
        self.distributed_address = checks.check_str("distributed_address", distributed_address)
        self.wait_agents_time_in_seconds = checks.check_int("wait_agents_time_in_seconds",
                                                            wait_agents_time_in_seconds, 0)
        keys = curve.resolve(keys_dir)  # checked here, before a Worker starts: a clear error from start_servable
        curve.require_keys(self.distributed_address, keys, "The distributed worker", "distributed")
        self.keys_dir = str(keys.directory) if keys is not None else None


def _device_type(value: str | None) -> str | None:
    if value is None or value == "None":
        return None
    checks.check_str("device_type", value)
    low = value.lower()
    if low in ("gpu", "cpu"):
        return low
    if low == "ascend":
        raise RuntimeError(f"The device type '{value}' of servable is inconsistent with current running environment")
    raise RuntimeError(f"Unsupported device type '{value}', only support 'Ascend', 'GPU', 'CPU' and None, case ignored")
