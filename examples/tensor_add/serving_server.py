"""Start the `add` servable: REST on 127.0.0.1:1500, ZMQ on 127.0.0.1:5500. Run from this folder."""

import os
import sys

from servable_framework import server

sys.path.insert(0, os.path.join(os.path.dirname(os.path.realpath(__file__)), "export_model"))


def start():
    servable_dir = os.path.dirname(os.path.realpath(sys.argv[0]))
    if not os.path.exists(os.path.join(servable_dir, "add", "1", "tensor_add.pt2")):
        from add_model import export  # the model file is generated, never committed

        print("exported", export(servable_dir))
    config = server.ServableStartConfig(servable_directory=servable_dir, servable_name="add", device_ids=0)
    server.start_servables(servable_configs=config)
    server.start_zmq_server(address="127.0.0.1:5500")
    server.start_restful_server(address="127.0.0.1:1500")


if __name__ == "__main__":
    start()
