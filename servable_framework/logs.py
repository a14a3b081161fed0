"""One logging set-up per process, called at the top of each process main (never on import)."""

from __future__ import annotations

import logging
import os

_LEVELS = {"0": logging.DEBUG, "1": logging.INFO, "2": logging.WARNING, "3": logging.ERROR}


def setup_logging(role: str) -> None:
    """Log to stderr as ``time level role[pid] message``. Level: ``SERVABLE_LOG_LEVEL`` or MindSpore's
    ``GLOG_v`` (0=DEBUG 1=INFO 2=WARNING 3=ERROR); INFO by default so start-up progress is visible."""
    level_name = os.environ.get("SERVABLE_LOG_LEVEL") or os.environ.get("GLOG_v", "1")
    level = _LEVELS.get(level_name) or getattr(logging, level_name.upper(), logging.INFO)
    logging.basicConfig(level=level, force=True,
                        format=f"%(asctime)s %(levelname)s {role}[%(process)d] %(name)s: %(message)s")
    for noisy in ("uvicorn.access", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
