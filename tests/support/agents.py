"""Agent startup script for tests: ``python -m tests.support.agents ADDRESS FILE [FILE ...] [--rank-start N]``."""

from __future__ import annotations

import argparse

from servable_framework.server import distributed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("address")
    p.add_argument("files", nargs="+")
    p.add_argument("--rank-start", type=int)
    p.add_argument("--max-restarts", type=int, default=3)
    a = p.parse_args()
    distributed.startup_agents(a.address, model_files=a.files, rank_start=a.rank_start, max_restarts=a.max_restarts)


if __name__ == "__main__":
    main()
