"""Generic server script for tests: ``python -m tests.support.serve local|distributed ...`` (prints nothing)."""

from __future__ import annotations

import argparse

from servable_framework import server
from servable_framework.server import distributed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["local", "distributed"])
    p.add_argument("--dir", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--rest")
    p.add_argument("--zmq")
    p.add_argument("--device-ids", type=int, nargs="*")
    p.add_argument("--rank-table")
    p.add_argument("--dist-address")
    p.add_argument("--wait", type=int, default=0)
    p.add_argument("--max-msg-mb", type=int, default=100)
    p.add_argument("--ssl", nargs="+", metavar="PEM", help="REST over HTTPS: CERT KEY [CA]")
    p.add_argument("--verify-client", action="store_true", help="with --ssl: mutual TLS (needs CA)")
    p.add_argument("--also-local", nargs=2, metavar=("DIR", "NAME"), help="a second, local servable in the same Main")
    a = p.parse_args()
    if a.also_local:
        server.start_servables(server.ServableStartConfig(a.also_local[0], a.also_local[1], device_ids=0))
    if a.mode == "local":
        server.start_servables(server.ServableStartConfig(a.dir, a.name, device_ids=a.device_ids))
    else:
        distributed.start_servable(a.dir, a.name, rank_table_json_file=a.rank_table, version_number=1,
                                   distributed_address=a.dist_address, wait_agents_time_in_seconds=a.wait)
    if a.zmq:
        server.start_zmq_server(a.zmq, max_msg_mb_size=a.max_msg_mb)
    if a.rest:
        tls = server.SSLConfig(*a.ssl[:3], verify_client=a.verify_client) if a.ssl else None
        server.start_restful_server(a.rest, max_msg_mb_size=a.max_msg_mb, ssl_config=tls)


if __name__ == "__main__":
    main()
