"""Call `matmul` over ZMQ with x = ones([128, 96]); every output value is -48.0."""

import numpy as np

from servable_framework.client import Client


def run_matmul():
    client = Client("127.0.0.1:5500", "matmul", "predict")
    result = client.infer({"x": np.ones((128, 96), np.float32)})
    print(result)


if __name__ == "__main__":
    run_matmul()
