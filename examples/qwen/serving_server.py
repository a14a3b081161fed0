"""Serve Qwen2.5-VL (`POST /model/qwen:predict`): REST 127.0.0.1:1500, ZMQ 127.0.0.1:5500, Agents on 6200.

    python serving_server.py [--checkpoint DIR] [--tp 2] [--stages 1]   # then: python serving_agent.py --rank-start 0

Without --checkpoint the tiny offline model is used (built on first use under tiny_models/).
"""

import argparse
import os
import sys

from servable_framework import server
from servable_framework.server import distributed

HERE = os.path.dirname(os.path.realpath(sys.argv[0]))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))


def rank_table(ranks):
    return os.path.join(REPO, "rank_tables", f"rank_table_{ranks}pcs.json")


def start(checkpoint=None, tp=2, stages=1, rest="127.0.0.1:1500", zmq="127.0.0.1:5500", dist="127.0.0.1:6200"):
    ranks = tp * stages
    if checkpoint:
        os.environ["QWEN_CHECKPOINT"] = os.path.abspath(checkpoint)  # read by servables/qwen/servable_config.py
    os.environ["QWEN_RANK_SIZE"], os.environ["QWEN_STAGE_SIZE"] = str(ranks), str(stages)
    distributed.start_servable(os.path.join(REPO, "servables"), "qwen", rank_table_json_file=rank_table(ranks),
                               version_number=1, distributed_address=dist)
    server.start_zmq_server(zmq)
    server.start_restful_server(rest)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a Hugging Face Qwen2.5-VL checkpoint directory")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks per stage")
    parser.add_argument("--stages", type=int, default=1, help="pipeline stages")
    parser.add_argument("--rest", default="127.0.0.1:1500")
    parser.add_argument("--zmq", default="127.0.0.1:5500")
    parser.add_argument("--distributed-address", default="127.0.0.1:6200")
    a = parser.parse_args()
    start(a.checkpoint, a.tp, a.stages, a.rest, a.zmq, a.distributed_address)
