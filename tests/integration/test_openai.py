"""The OpenAI-compatible API (``/v1/models``, ``/v1/chat/completions``) with the real ``openai`` package, against
examples/qwen (Main + Distributed Worker + 2 TP Agents, tiny Qwen2.5-VL) and the tiny Qwen2.5 text servable.

Answers and usage are checked against the unsharded Hugging Face model's own greedy generation of the same chat,
prepared with the stock processor / tokenizer calls (not the servable's code).
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import Servers
from tests.integration.test_qwen_servable import png, start_qwen, tiny_ckpt  # noqa: F401  (fixture)
from tests.integration.test_qwen_text_servable import start_qwen_text
from tests.integration.test_streaming import cancelled_running
from tests.support.procs import Rest, wait_until

PROMPT = "Tell me a long story about tensor parallel inference."


@dataclass
class Generated:
    text: str
    tokens: list[int]  # the new tokens, EOS excluded
    eos: bool  # generation ended on EOS
    prompt_tokens: int


Reference = Callable[[list[dict[str, Any]], int], Generated]


def _greedy(model: Any, tokenizer: Any, inputs: dict[str, Any], n: int) -> tuple[list[int], bool]:
    import torch

    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id])
    for i, token in enumerate(new):
        if token in eos:
            return new[:i], True
    return new, False


@pytest.fixture(scope="module")
def qwen(module_servers: Servers, tiny_ckpt: Path) -> Iterator[tuple[Rest, openai.OpenAI]]:  # noqa: F811
    _, _, rest, _ = start_qwen(module_servers, tiny_ckpt, tp=2)
    client = openai.OpenAI(base_url=f"{rest.base}/v1", api_key="unused", max_retries=0, timeout=120)
    yield rest, client
    client.close()
    rest.close()


@pytest.fixture(scope="module")
def reference(tiny_ckpt: Path) -> Reference:  # noqa: F811
    """Greedy generation of the unsharded HF Qwen2.5-VL for OpenAI-style messages (data-URL images)."""
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    from servables.qwen.vision_compat import load_processor

    processor = load_processor(str(tiny_ckpt))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_ckpt)).eval()

    def generate(messages: list[dict[str, Any]], n: int) -> Generated:
        chat, images = [], []
        for m in messages:
            parts = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else []
            for p in [] if isinstance(m["content"], str) else m["content"]:
                if p["type"] == "text":
                    parts.append(p)
                else:
                    raw = base64.b64decode(p["image_url"]["url"].split(",", 1)[1])
                    images.append(Image.open(io.BytesIO(raw)).convert("RGB"))
                    parts.append({"type": "image", "image": images[-1]})
            chat.append({"role": m["role"], "content": parts})
        text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=images or None, return_tensors="pt")
        tokens, eos = _greedy(model, processor.tokenizer, inputs, n)
        return Generated(processor.tokenizer.decode(tokens, skip_special_tokens=True), tokens, eos,
                         int(inputs["input_ids"].shape[1]))

    return generate


def user(*parts: Any) -> list[dict[str, Any]]:
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return [{"role": "user", "content": content}]


def image_part(data: bytes) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}


def streamed(client: openai.OpenAI, **kw: Any) -> list[Any]:
    return list(client.chat.completions.create(stream=True, **kw))


def joined(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def check_chunk_order(chunks: list[Any], usage: bool, model: str = "qwen") -> str:
    """OpenAI's order: role, content deltas, finish, [usage with no choices]; one id; returns the finish reason."""
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" and c.model == model for c in chunks)
    if usage:
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        chunks = chunks[:-1]
    assert all(c.choices and c.usage is None for c in chunks)
    first, *content, last = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert first.choices[0].finish_reason is None
    assert all(c.choices[0].delta.content and c.choices[0].finish_reason is None for c in content)
    assert last.choices[0].delta.content is None and last.choices[0].finish_reason is not None
    return str(last.choices[0].finish_reason)


def test_models_lists_the_chat_servable(qwen) -> None:
    _, client = qwen
    assert [m.id for m in client.models.list()] == ["qwen"]
    assert client.models.retrieve("qwen").id == "qwen"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_text_answer_and_usage_match_the_unsharded_model(qwen, reference) -> None:
    _, client = qwen
    messages = [{"role": "system", "content": "You are brief."}, *user("Hello, world!")]
    ref = reference(messages, 12)
    r = client.chat.completions.create(model="qwen", messages=messages, max_tokens=12, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "qwen"
    assert abs(r.created - time.time()) < 60
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ("stop" if ref.eos else "length")
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.prompt_tokens, len(ref.tokens))
    assert r.usage.total_tokens == ref.prompt_tokens + len(ref.tokens)


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_streamed_equals_non_streamed(qwen, reference, with_image: bool) -> None:
    _, client = qwen
    messages = user(image_part(png("blue")), "What is in this picture?") if with_image else user(PROMPT)
    plain = client.chat.completions.create(model="qwen", messages=messages, max_tokens=24)
    chunks = streamed(client, model="qwen", messages=messages, max_tokens=24,
                      stream_options={"include_usage": True})
    assert joined(chunks) == plain.choices[0].message.content
    assert check_chunk_order(chunks, usage=True) == plain.choices[0].finish_reason
    assert chunks[-1].usage == plain.usage
    assert len(chunks) > 24 // 4  # sent as tokens are generated, not in one piece
    ref = reference(messages, 24)
    assert plain.choices[0].message.content == ref.text
    assert plain.usage is not None and plain.usage.prompt_tokens == ref.prompt_tokens
    no_usage = streamed(client, model="qwen", messages=messages, max_tokens=24)
    assert joined(no_usage) == joined(chunks) and check_chunk_order(no_usage, usage=False)


def test_raw_event_stream_format(qwen) -> None:
    rest, _ = qwen
    body = {"model": "qwen", "messages": user("Hi"), "max_tokens": 4, "stream": True}
    with rest.client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "usage" not in first  # only with stream_options.include_usage


def test_stop_string_ends_the_text_before_it_and_cancels_the_row(qwen) -> None:
    rest, client = qwen
    messages = user(PROMPT)
    full = client.chat.completions.create(model="qwen", messages=messages, max_tokens=48).choices[0].message.content
    assert full and len(full) > 20
    mid = len(full) // 2
    stop = full[mid:mid + 4]
    expected = full[:full.find(stop)]
    assert expected, "the stop string must not occur at the very start"
    before = cancelled_running(rest)
    r = client.chat.completions.create(model="qwen", messages=messages, max_tokens=512, stop=[stop, "never seen"])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    assert r.usage is not None and 0 < r.usage.completion_tokens < 48 + 16  # stopped near the stop string
    # the 512-token row stopped early: the stop string cancelled it on the Agents
    wait_until(lambda: cancelled_running(rest) >= before + 1, 10, "the running row to be cancelled")
    chunks = streamed(client, model="qwen", messages=messages, max_tokens=512, stop=stop,
                      stream_options={"include_usage": True})
    assert joined(chunks) == expected and check_chunk_order(chunks, usage=True) == "stop"
    assert chunks[-1].usage.completion_tokens > 0


def test_max_tokens_gives_length(qwen) -> None:
    _, client = qwen
    r = client.chat.completions.create(model="qwen", messages=user(PROMPT), max_completion_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage is not None and r.usage.completion_tokens == 3
    chunks = streamed(client, model="qwen", messages=user(PROMPT), max_tokens=3)
    assert check_chunk_order(chunks, usage=False) == "length"
    assert joined(chunks) == r.choices[0].message.content


def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return dict(body["error"])


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(qwen) -> None:
    rest, client = qwen
    hi = user("Hi")
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="nope", messages=hi)
    assert _error(nf.value)["param"] == "model"
    cases: list[tuple[dict[str, Any], str, str | None]] = [
        ({"messages": hi, "n": 2}, "not supported", "n"),
        ({"messages": hi, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
         "not supported", "tools"),
        ({"messages": hi, "logprobs": True}, "not supported", "logprobs"),
        ({"messages": user({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "What?")},
         "never fetches URLs", "messages[0].content[0].image_url.url"),
        ({"messages": hi, "temperature": "hot"}, "valid number", "temperature"),
        ({"messages": hi, "max_tokens": "12"}, "valid integer", "max_tokens"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "'user'", "messages[0].role"),
        ({"messages": []}, "at least 1", "messages"),
        ({"messages": hi, "max_tokens": 100000}, "max_tokens 100000 is out of range", None),  # the servable's cap
    ]
    for kw, fragment, param in cases:
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="qwen", **kw)
        err = _error(bad.value)
        assert fragment in err["message"] and err["param"] == param and err["type"] == "invalid_request_error", \
            (kw, err)
        assert "Failed, method" not in err["message"]  # the servable's own text, not the framework's wrapping
    for raw in (b'{"model": "qwen", "messages": [', b"[1, 2]", b""):
        r = rest.post("/v1/chat/completions", raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "error" in r.json(), r.text
    assert rest.client.get("/v1/chat/completions").status_code == 405
    r = rest.post("/v1/nothing/here", b"{}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    # MindSpore's routes are untouched
    assert rest.post("/model/qwen:predict", b"not json").json().keys() == {"error_msg"}
    ok = client.chat.completions.create(model="qwen", messages=hi, max_tokens=2)
    assert ok.choices[0].finish_reason == "length"


def test_deadline_and_disconnect_cancel_the_rows(qwen) -> None:
    rest, client = qwen
    with pytest.raises(openai.APIStatusError) as late:
        client.chat.completions.create(model="qwen", messages=user(PROMPT), max_tokens=512,
                                       extra_headers={"X-Request-Timeout-S": "0.3"})
    assert late.value.status_code == 504 and _error(late.value)["type"] == "timeout_error"
    before = cancelled_running(rest)
    stream = client.chat.completions.create(model="qwen", messages=user(PROMPT), max_tokens=512, stream=True)
    for n, _ in enumerate(stream):
        if n == 2:
            break
    stream.close()  # hang up mid-stream
    wait_until(lambda: cancelled_running(rest) >= before + 1, 10, "the running row to be cancelled")
    assert client.chat.completions.create(model="qwen", messages=user("Hi"), max_tokens=2).choices


def test_a_deadline_mid_stream_is_an_error_event(qwen) -> None:
    """The 200 is out: the timeout arrives as ``data: {"error": ...}`` then ``[DONE]``; the client raises."""
    rest, client = qwen
    body = {"model": "qwen", "messages": user(PROMPT), "max_tokens": 512, "stream": True}
    with rest.client.stream("POST", "/v1/chat/completions", json=body,
                            headers={"X-Request-Timeout-S": "1.5"}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])["error"]
    assert error["type"] == "timeout_error" and "timed out" in error["message"]
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model="qwen", messages=user(PROMPT), max_tokens=512, stream=True,
                                                extra_headers={"X-Request-Timeout-S": "1.5"}):
            pass


# ------------------------------------------------------------------------------------------- Qwen2.5 text


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from servables.qwen_text.tiny_model import build_tiny_qwen_text

    return build_tiny_qwen_text(tmp_path_factory.mktemp("tiny_text"))


def test_qwen_text_servable_chats(module_servers: Servers, text_ckpt: Path) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    _, _, rest, _ = start_qwen_text(module_servers, text_ckpt, tp=2)
    client = openai.OpenAI(base_url=f"{rest.base}/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        assert "qwen_text" in [m.id for m in client.models.list()]
        messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
        r = client.chat.completions.create(model="qwen_text", messages=messages, max_tokens=16)
        chunks = streamed(client, model="qwen_text", messages=messages, max_tokens=16,
                          stream_options={"include_usage": True})
        with pytest.raises(openai.BadRequestError):  # a text-only servable: the servable's own 400
            client.chat.completions.create(model="qwen_text", messages=user(image_part(png()), "What?"))
    finally:
        client.close()
        rest.close()
    tokenizer = AutoTokenizer.from_pretrained(text_ckpt)
    model = Qwen2ForCausalLM.from_pretrained(text_ckpt, dtype=torch.float32).eval()
    hf_messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
    enc = tokenizer.apply_chat_template(hf_messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    tokens, eos = _greedy(model, tokenizer, dict(enc), 16)
    assert r.choices[0].message.content == tokenizer.decode(tokens, skip_special_tokens=True)
    assert r.choices[0].finish_reason == ("stop" if eos else "length")
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (enc["input_ids"].shape[1], len(tokens))
    assert joined(chunks) == r.choices[0].message.content and chunks[-1].usage == r.usage
    assert check_chunk_order(chunks, usage=True, model="qwen_text") == r.choices[0].finish_reason


# ------------------------------------------------------------------------------------------- in-process


def test_stop_strings_are_held_back_across_pieces() -> None:
    """`completion` on a scripted stream: a stop string split across pieces is never sent in part, text that
    only looked like one is sent, and the dispatcher's stream is closed (which cancels the request)."""
    import asyncio

    import numpy as np

    from servable_framework.main.dispatcher import StreamPiece
    from servable_framework.main.openai_api import Usage, completion

    closed = []

    async def pieces(texts: list[str]) -> Any:
        try:
            for i, t in enumerate(texts):
                yield StreamPiece(0, {"text": t, "completion_tokens": np.arange(2)},
                                  "length" if i == len(texts) - 1 else None)
        finally:
            closed.append(True)

    async def run(texts: list[str], stops: list[str]) -> tuple[list[str], str | None, int]:
        usage = Usage()
        events = [event async for event in completion(pieces(texts), stops, usage)]
        return [text for text, _ in events], events[-1][1], usage.completion_tokens

    assert asyncio.run(run(["Hello wo", "rld. EN", "D here"], ["END"])) == (["Hello wo", "rld. ", ""], "stop", 6)
    assert asyncio.run(run(["a E", "Nd", "!"], ["END"])) == (["a ", "ENd", "!"], "length", 6)
    assert asyncio.run(run(["abc"], [])) == (["abc"], "length", 2)
    assert closed == [True, True, True]


def test_413_and_error_mapping_in_process() -> None:
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from servable_framework.errors import InvalidInput, Overloaded, RequestTimeout, ServingError, Unavailable
    from servable_framework.main import openai_api

    class NoWorkers:
        workers: dict[str, Any] = {}

    class FakeDispatcher:
        workers = NoWorkers()

    app = Starlette(routes=openai_api.routes(FakeDispatcher(), 200))  # type: ignore[arg-type]
    with TestClient(app) as tc:
        r = tc.post("/v1/chat/completions", content=json.dumps({"model": "x", "messages": user("y" * 300)}))
        assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
        r = tc.post("/v1/chat/completions", content=json.dumps({"model": "x", "messages": user("y")}))
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert tc.get("/v1/models").json() == {"object": "list", "data": []}
    for exc, status in ((Overloaded("full"), 429), (Unavailable("down"), 503), (RequestTimeout("late"), 504),
                        (InvalidInput("bad"), 400), (ServingError("bug"), 500)):
        resp = openai_api.error_response(exc)
        assert resp.status_code == status
        assert json.loads(bytes(resp.body))["error"]["message"] == exc.message
    assert openai_api.error_response(Overloaded("full")).headers["retry-after"] == "1"
