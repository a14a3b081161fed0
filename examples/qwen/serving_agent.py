"""Start this host's Qwen2.5-VL Agents (one process per rank), each loading only its shard.

    python serving_agent.py --rank-start 0 [--agent-ip IP] [--checkpoint DIR]

The rank count and layout come from the server (its rank table): this host runs every rank of the rank table
ip of --rank-start (contract §6.3); --agent-ip is this host's ip (default: that rank table ip).
"""

import argparse
import os
import sys

from servable_framework.server import distributed

HERE = os.path.dirname(os.path.realpath(sys.argv[0]))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, REPO)


def start_agents(rank_start=0, checkpoint=None, agent_ip=None, address="127.0.0.1:6200"):
    from servable_framework.agent.worker_link import fetch_config

    if not checkpoint:
        from servables.qwen.tiny_model import build_tiny_qwen

        checkpoint = str(build_tiny_qwen(os.path.join(REPO, "tiny_models")))
    table = fetch_config(address, 60.0).ranks  # (ip, device_id) per rank
    count = sum(1 for ip, _ in table if ip == table[rank_start][0])
    distributed.startup_agents(distributed_address=address, model_files=[os.path.abspath(checkpoint)] * count,
                               agent_ip=agent_ip or table[rank_start][0], rank_start=rank_start)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank-start", type=int, default=0)
    parser.add_argument("--checkpoint", help="the same checkpoint directory as the server's")
    parser.add_argument("--agent-ip", help="this host's ip (default: the rank table ip of --rank-start)")
    parser.add_argument("--distributed-address", default="127.0.0.1:6200")
    a = parser.parse_args()
    start_agents(a.rank_start, a.checkpoint, a.agent_ip, a.distributed_address)
