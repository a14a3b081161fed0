"""`fast_http._uvicorn_fits`: Main's own HTTP protocol steps aside, logging once, when uvicorn lacks a part of its
protocol that it uses (a release that renamed one)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from servable_framework.main import fast_http


def test_a_protocol_missing_a_part_is_left_to_uvicorn_and_logged_once(caplog, monkeypatch) -> None:
    monkeypatch.setattr(fast_http, "_fits", None)
    whole = SimpleNamespace(**{name: None for name in fast_http._UVICORN_PARTS})
    assert fast_http._uvicorn_fits(whole)  # type: ignore[arg-type]
    monkeypatch.setattr(fast_http, "_fits", None)  # (another uvicorn: found again)
    lacking = SimpleNamespace(**{name: None for name in fast_http._UVICORN_PARTS if name != "pipeline"})
    with caplog.at_level(logging.WARNING, logger="servable_framework.rest"):
        assert not fast_http._uvicorn_fits(lacking)  # type: ignore[arg-type]
        assert not fast_http._uvicorn_fits(lacking)  # type: ignore[arg-type]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "pipeline" in warnings[0] and "SERVABLE_HTTP_DIRECT=0" in warnings[0]
