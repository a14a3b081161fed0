"""KServe v2 / Open Inference Protocol REST (``/v2/...``). Not written yet."""

from __future__ import annotations

from starlette.routing import BaseRoute

from servable_framework.main.dispatcher import Dispatcher


def routes(dispatcher: Dispatcher, max_msg_bytes: int) -> list[BaseRoute]:
    """The routes this protocol adds to Main's REST app (mounted before MindSpore's catch-all route)."""
    return []
