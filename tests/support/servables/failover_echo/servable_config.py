"""`failover_echo`: a Python-only test servable (no model, so Workers start fast) for Worker fail-over tests.

Method ``echo(x, sleep_ms=0)`` -> ``y`` (``x`` as a float64 array, unchanged) and ``pid`` (the process id of the
Worker that answered). ``sleep_ms`` holds the instance in its Worker for that long, so that requests are in
flight when a Worker dies. A file named ``CRASH`` next to this file makes the import fail: a Worker (re)started
then dies while loading (what a broken deployment or a failing device looks like to Main).
"""

import os
import time

import numpy as np

from servable_framework.server import register

if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), "CRASH")):
    raise RuntimeError("failover_echo: the CRASH marker is present, this Worker refuses to start")


def echo_stage(x, sleep_ms):
    delay = float(np.asarray(sleep_ms).reshape(-1)[0])
    if delay > 0:
        time.sleep(delay / 1000.0)
    return np.asarray(x, np.float64), np.array(os.getpid(), np.int64)


@register.register_method(output_names=["y", "pid"])
def echo(x, sleep_ms=0):
    y, pid = register.add_stage(echo_stage, x, sleep_ms, outputs_count=2)
    return y, pid
