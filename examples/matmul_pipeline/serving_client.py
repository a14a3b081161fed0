"""Send 8 concurrent requests to `matmul_pp` over ZMQ; every output value is -48.0."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from servable_framework.client import Client

if __name__ == "__main__":
    client = Client("127.0.0.1:5500", "matmul_pp", "predict")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: client.infer({"x": np.ones((128, 96), np.float32)}), range(8)))
    print([bool((r[0]["y"] == -48.0).all()) for r in results])
