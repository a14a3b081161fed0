"""Start the 4 Agents of `matmul_pp` (exports the per-rank weight files first if they are missing)."""

import os
import sys

from servable_framework.server import distributed

HERE = os.path.dirname(os.path.realpath(sys.argv[0]))
sys.path.insert(0, os.path.join(HERE, "..", "matmul_distributed", "export_model"))


def start_agents():
    if not os.path.exists(os.path.join(HERE, "model", "device3", "matmul.safetensors")):
        from distributed_inference import export  # shard files are generated, never committed

        export(os.path.join(HERE, "model"), ranks=4, stages=2)
    distributed.startup_agents(distributed_address="127.0.0.1:6200",
                               model_files=[f"model/device{i}/matmul.safetensors" for i in range(4)])


if __name__ == "__main__":
    start_agents()
