"""Call `add` over ZMQ: add_common with float32 inputs, add_cast with int32 inputs."""

import numpy as np

from servable_framework.client import Client


def run_add_common():
    client = Client("127.0.0.1:5500", "add", "add_common")
    instances = [{"x1": np.full((2, 2), i, np.float32), "x2": np.full((2, 2), i, np.float32)} for i in (1, 2, 3)]
    print(client.infer(instances))


def run_add_cast():
    client = Client("127.0.0.1:5500", "add", "add_cast")
    print(client.infer([{"x1": np.ones((2, 2), np.int32), "x2": np.ones((2, 2), np.int32)}]))


if __name__ == "__main__":
    run_add_common()
    run_add_cast()
