"""Start this host's Agents of `matmul` (exports the weight shards first if they are missing).

    python serving_agent.py                 # every rank of this host
    python serving_agent.py --rank-start 4 --agent-ip IP  # multi-host: every rank of the host of rank 4
"""

import argparse
import os
import sys

from servable_framework.server import distributed

HERE = os.path.dirname(os.path.realpath(sys.argv[0]))
sys.path.insert(0, os.path.join(HERE, "export_model"))


def start_agents(rank_start=None, ranks=8, agent_ip=None):
    if not os.path.exists(os.path.join(HERE, "model", f"device{ranks - 1}", "matmul.safetensors")):
        from distributed_inference import export  # shard files are generated, never committed

        export(os.path.join(HERE, "model"), ranks)
    first = rank_start or 0
    model_files = [f"model/device{i}/matmul.safetensors" for i in range(first, ranks)]
    distributed.startup_agents(distributed_address="127.0.0.1:6200", model_files=model_files, agent_ip=agent_ip,
                               rank_start=rank_start)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rank-start", type=int, default=None, help="first rank of this host (multi-host)")
    parser.add_argument("--agent-ip", default=None, help="this host's ip (with --rank-start)")
    a = parser.parse_args()
    start_agents(a.rank_start, agent_ip=a.agent_ip)
