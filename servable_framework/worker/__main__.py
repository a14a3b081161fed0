"""Entry point of a Worker process: ``python -m servable_framework.worker`` (spawned by Main)."""

from servable_framework.worker.worker import worker_main

if __name__ == "__main__":
    worker_main()
