"""Rank table JSON (MindSpore's ``server_list`` or ``group_list`` layout, contract §6.2): rank -> (ip, device).

Each rank's ``server_id`` is the address of its host on the network the hosts share: its Agents' collectives
listen there (gloo/NCCL), so it must be an address of the machine that starts those ranks, never a wildcard.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

WILDCARDS = ("0.0.0.0", "*", "::")


@dataclass(frozen=True)
class RankInfo:
    rank: int
    ip: str
    device_id: int


def _canonical_int(value: Any, what: str) -> int:
    if not isinstance(value, str) or not value:
        raise RuntimeError(f"Rank table: '{what}' should be a non-empty string")
    if not value.isdigit() or str(int(value)) != value:
        raise RuntimeError(f"Rank table: '{what}' value '{value}' is not a decimal integer")
    return int(value)


def _array(obj: dict[str, Any], key: str) -> list[Any]:
    value = obj.get(key)
    if not isinstance(value, list) or not value:
        raise RuntimeError(f"Rank table: '{key}' should be a non-empty array")
    return value


def parse_rank_table(path: str) -> list[RankInfo]:
    """Read and check a rank table file; ranks come back in order 0..n-1."""
    if not os.path.isfile(path):
        raise RuntimeError(f"Rank table file '{path}' does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"Rank table file '{path}' is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RuntimeError(f"Rank table file '{path}' should hold a JSON object")
    entries: list[tuple[str, Any, Any]] = []  # (ip, device_id, rank_id)
    if "group_list" in data:
        for group in _array(data, "group_list"):
            for inst in _array(group, "instance_list"):
                devices = _array(inst, "devices")
                entries.append((inst.get("server_id"), devices[0].get("device_id"), inst.get("rank_id")))
    else:
        for server in _array(data, "server_list"):
            for dev in _array(server, "device"):
                entries.append((server.get("server_id"), dev.get("device_id"), dev.get("rank_id")))
    ranks = []
    for expected, (ip, device, rank) in enumerate(entries):
        if not isinstance(ip, str) or not ip:
            raise RuntimeError("Rank table: 'server_id' should be a non-empty string")
        if ip in WILDCARDS:  # each rank listens on its host's address and its peers connect to it there
            raise RuntimeError(f"Rank table: 'server_id' '{ip}' is not a host address; name the address at which "
                               f"the other hosts reach this host's Agents")
        info = RankInfo(_canonical_int(rank, "rank_id"), ip, _canonical_int(device, "device_id"))
        if info.rank != expected:
            raise RuntimeError(f"Rank table: device size not match rank_id, expected rank {expected}, got {info.rank}")
        ranks.append(info)
    return ranks


def check_against_declaration(ranks: list[RankInfo], path: str, rank_size: int, stage_size: int) -> None:
    """Consistency with ``declare_servable`` (contract §6.2); the MindSpore 8-device layout rules are relaxed:
    any number of ranks per host is allowed, device ids must be unique per host."""
    if rank_size % stage_size != 0:
        raise RuntimeError("Rank size must be an integral multiple of stage size")
    if len(ranks) != rank_size:
        raise RuntimeError(f"Rank size {len(ranks)} declared in rank table file '{path}' not equal to {rank_size} "
                           f"declared in servable config")
    seen: set[tuple[str, int]] = set()
    for r in ranks:
        if (r.ip, r.device_id) in seen:
            raise RuntimeError(f"Rank table: device id {r.device_id} is repeated on server {r.ip}")
        seen.add((r.ip, r.device_id))
