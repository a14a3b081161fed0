"""Start `matmul_pp` (2 stages x 2 TP); then run serving_agent.py. Run from this folder."""

import os
import sys

from servable_framework import server
from servable_framework.server import distributed


def start():
    servable_dir = os.path.dirname(os.path.realpath(sys.argv[0]))
    distributed.start_servable(servable_dir, "matmul_pp", rank_table_json_file="../../rank_tables/"
                               "rank_table_4pcs_2stages.json", version_number=1, distributed_address="127.0.0.1:6200")
    server.start_zmq_server("127.0.0.1:5500")
    server.start_restful_server("127.0.0.1:1500")


if __name__ == "__main__":
    start()
