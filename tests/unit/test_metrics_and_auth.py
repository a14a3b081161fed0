"""Pure logic of `servable_framework.main.metrics` (what counts as a token, a first token, a gap) and
`servable_framework.main.auth` (key loading, comparison, the exposure warning)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from servable_framework.errors import ServingError
from servable_framework.main.auth import ApiKeys, load_keys, warn_if_exposed
from servable_framework.main.metrics import Metrics
from servable_framework.settings import Settings


def sample(m: Metrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, {"servable": "s", "protocol": "rest", **labels}) or 0.0


def test_tokens_of_plain_results() -> None:
    m = Metrics()
    rec = m.request("s", "rest")
    rec.results([
        {"text": "ab", "completion_tokens": np.array(9), "prompt_tokens": np.array(3)},  # counts
        {"text": "cd", "completion_tokens": np.array([4]), "prompt_tokens": np.arange(6)},  # ids: one, six
        {"text": "ef", "tokens": np.arange(5)},  # ids without completion_tokens
        {"text": "no counts", "tokens": np.array([1.5, 2.5]), "prompt_tokens": np.array(2.0)},  # not integers
        ServingError("failed"),
    ])
    rec.finish("ok")
    assert sample(m, "servable_generation_tokens_total") == 9 + 1 + 5
    assert sample(m, "servable_prompt_tokens_total") == 3 + 6
    assert sample(m, "servable_request_latency_seconds_count") == 1
    assert sample(m, "servable_requests_finished_total", outcome="ok") == 1
    assert sample(m, "servable_time_to_first_token_seconds_count") == 0  # not a stream


def test_stream_pieces_time_each_instance() -> None:
    m = Metrics()
    rec = m.request("s", "rest")
    rec.piece(0, {"text": "a", "tokens": np.arange(2)})
    rec.piece(1, {"text": "", "tokens": np.arange(1)})  # held-back text, but a token: output
    rec.piece(0, {"text": "b", "tokens": np.arange(3)})
    rec.piece(0, {"text": "", "tokens": np.arange(0), "prompt_tokens": np.array(7)})  # last: nothing new
    rec.piece(1, {"text": "c", "tokens": np.arange(1), "prompt_tokens": np.array(4)})
    rec.finish("error")
    rec.finish("ok")  # only the first counts
    assert sample(m, "servable_time_to_first_token_seconds_count") == 2
    assert sample(m, "servable_time_per_output_token_seconds_count") == 2
    assert sample(m, "servable_generation_tokens_total") == 7
    assert sample(m, "servable_prompt_tokens_total") == 11
    assert sample(m, "servable_request_latency_seconds_count") == 0  # failed requests: outcome only
    assert sample(m, "servable_requests_finished_total", outcome="error") == 1
    assert sample(m, "servable_requests_finished_total", outcome="ok") == 0


def test_stream_openai_chat_outputs() -> None:
    """The chat method's outputs: prompt and completion token ids as rows (the prompt's all in the first piece),
    or 0-d counts in the last piece."""
    m = Metrics()
    rec = m.request("s", "openai")
    rec.piece(0, {"text": "He", "prompt_tokens": np.arange(9), "completion_tokens": np.arange(1)})
    rec.piece(0, {"text": "", "prompt_tokens": np.arange(0), "completion_tokens": np.arange(0)})  # no output
    rec.piece(0, {"text": "llo", "prompt_tokens": np.arange(0), "completion_tokens": np.arange(2)})
    rec.piece(1, {"text": "Hi"})
    rec.piece(1, {"text": "!", "completion_tokens": np.array(2), "prompt_tokens": np.array(5)})
    rec.finish("ok")
    assert sample(m, "servable_generation_tokens_total", protocol="openai") == 3 + 2
    assert sample(m, "servable_prompt_tokens_total", protocol="openai") == 9 + 5
    assert sample(m, "servable_time_to_first_token_seconds_count", protocol="openai") == 2
    assert sample(m, "servable_time_per_output_token_seconds_count", protocol="openai") == 2


def test_observe_request_for_protocol_modules() -> None:
    m = Metrics(known_servable=lambda name: name == "s")
    m.observe_request("s", "kserve", 0.002, ok=True)
    m.observe_request("s", "kserve", 0.5, ok=False)
    m.observe_request("made-up", "kserve", 0.1, ok=False)
    assert sample(m, "servable_request_latency_seconds_count", protocol="kserve") == 1
    assert sample(m, "servable_request_latency_seconds_bucket", protocol="kserve", le="0.0025") == 1
    assert sample(m, "servable_requests_finished_total", protocol="kserve", outcome="error") == 1
    assert b"made-up" not in m.render()


def test_load_keys(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text("# comment\n\n  key-one  \nkey-two\n")
    keys = load_keys(Settings(api_key_file=str(f), api_keys=" key-three, ,"))  # type: ignore[arg-type]
    assert len(keys) == 3 and repr(keys) == "ApiKeys(3 keys)"
    assert keys.allows(b"key-one") and keys.allows(b"key-two") and keys.allows(b"key-three")
    assert not keys.allows(b"key-on") and not keys.allows(b"key-one ") and not keys.allows(b"")
    assert not load_keys(Settings())
    assert not load_keys(Settings(api_keys=""))  # type: ignore[arg-type]


@pytest.mark.parametrize(("content", "fragment"), [
    (None, "cannot read the API key file"),
    ("# only a comment\n\n", "holds no key"),
    ("good\nsecret with space\n", "line 2 of the API key file"),
    ("g\u00fcltig\n", "line 1 of the API key file"),
])
def test_bad_key_file_fails_without_showing_keys(tmp_path: Path, content: str | None, fragment: str) -> None:
    f = tmp_path / "keys"
    if content is not None:
        f.write_text(content)
    with pytest.raises(RuntimeError, match=fragment) as info:
        load_keys(Settings(api_key_file=str(f)))
    assert "secret" not in str(info.value) and "ltig" not in str(info.value)


def test_warning_when_exposed(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "servable_framework.auth"):
        warn_if_exposed("127.0.0.1", ApiKeys([]), tls=False)
        warn_if_exposed("::1", ApiKeys([]), tls=False)
        warn_if_exposed("0.0.0.0", ApiKeys([]), tls=True)
        assert not caplog.records
        warn_if_exposed("0.0.0.0", ApiKeys([]), tls=False)
        assert "no API key and no TLS" in caplog.records[-1].getMessage()
        warn_if_exposed("10.1.2.3", ApiKeys(["k"]), tls=False)
        assert "clear text" in caplog.records[-1].getMessage()
