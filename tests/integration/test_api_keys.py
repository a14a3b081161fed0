"""API keys on the REST port, for real: the tensor_add example served with a key file and SERVABLE_API_KEYS.
The right key works, a missing or wrong one gets 401 in each protocol's error shape (MindSpore, OpenAI under
/v1, KServe under /v2) before any routing, /health and /ready stay open, and no key reaches the server's log.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from servable_framework.main.auth import INVALID, MISSING

FILE_KEYS = ("sk-file-one-0123456789abcdef", "sk-file-two-fedcba9876543210")
ENV_KEY = "sk-env-key-5555aaaa"
WRONG = "sk-wrong-key-77777777"
ADD = {"instances": [{"x1": [[1.0, 2.0], [3.0, 4.0]], "x2": [[1.0, 1.0], [1.0, 1.0]]}]}
OPENAI_401 = {"type": "invalid_request_error", "param": None, "code": "invalid_api_key"}


@pytest.fixture(scope="module")
def keyed_server(module_servers, add_dir, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "api_keys"
    key_file.write_text(f"# REST API keys\n{FILE_KEYS[0]}\n\n  {FILE_KEYS[1]}  \n")
    # DEBUG: the strongest check that nothing logs a key
    proc, rest, zmq_address = module_servers.local(add_dir, "add", SERVABLE_API_KEY_FILE=str(key_file),
                                                   SERVABLE_API_KEYS=f" {ENV_KEY} ,", SERVABLE_LOG_LEVEL="DEBUG")
    yield proc, rest, zmq_address
    rest.close()


def call(rest, method: str, path: str, key: str | None, **kw: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}".strip()} if key is not None else {}
    return rest.client.request(method, path, headers=headers, **kw)


@pytest.mark.parametrize("key", [*FILE_KEYS, ENV_KEY])
def test_every_configured_key_works(keyed_server, key: str) -> None:
    _, rest, _ = keyed_server
    r = call(rest, "POST", "/model/add:add_common", key, json=ADD)
    assert r.status_code == 200, r.text
    assert r.json() == {"instances": [{"y": [[2.0, 3.0], [4.0, 5.0]]}]}
    r = call(rest, "GET", "/metrics", key)
    assert r.status_code == 200 and "servable_requests_total" in r.text
    # the other protocols' routes are past the check (they may not exist yet: anything but 401)
    assert call(rest, "GET", "/v1/models", key).status_code == 200
    assert call(rest, "GET", "/v2", key).status_code == 200


@pytest.mark.parametrize("key", [None, WRONG, "", f"{FILE_KEYS[0]}x", FILE_KEYS[0][:-1]])
def test_missing_or_wrong_key_gets_401_in_each_protocols_shape(keyed_server, key: str | None) -> None:
    _, rest, _ = keyed_server
    text = MISSING if not key else INVALID
    for method, path, kw in (("POST", "/model/add:add_common", {"json": ADD}), ("GET", "/metrics", {}),
                             ("GET", "/model/nothere:x", {})):
        r = call(rest, method, path, key, **kw)
        assert (r.status_code, r.json()) == (401, {"error_msg": text}), path
        assert r.headers["www-authenticate"] == "Bearer"
    for path in ("/v1/models", "/v1/chat/completions"):
        r = call(rest, "POST" if "chat" in path else "GET", path, key, json={"model": "add", "messages": []})
        assert (r.status_code, r.json()) == (401, {"error": {"message": text, **OPENAI_401}}), path
    for path in ("/v2", "/v2/models/add", "/v2/health/ready"):
        r = call(rest, "GET", path, key)
        assert (r.status_code, r.json()) == (401, {"error": text}), path


def test_other_schemes_are_not_a_key(keyed_server) -> None:
    _, rest, _ = keyed_server
    for header in (FILE_KEYS[0], f"Basic {FILE_KEYS[0]}", "Bearer", f"Bearer{FILE_KEYS[0]}"):
        r = rest.client.post("/model/add:add_common", json=ADD, headers={"Authorization": header})
        assert r.status_code == 401, header
    r = rest.client.post("/model/add:add_common", json=ADD, headers={"authorization": f"bearer  {FILE_KEYS[1]}"})
    assert r.status_code == 200, r.text


def test_health_and_ready_stay_open(keyed_server) -> None:
    _, rest, _ = keyed_server
    assert call(rest, "GET", "/health", None).json() == {"status": "alive"}
    assert call(rest, "GET", "/ready", WRONG).status_code == 200


def test_openai_client_sends_the_key(keyed_server) -> None:
    _, rest, _ = keyed_server
    client = openai.OpenAI(base_url=f"{rest.base}/v1", api_key=WRONG, max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as info:
        client.models.list()
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    # with the right key it works (tensor_add has no chat method: no model to list)
    client = openai.OpenAI(base_url=f"{rest.base}/v1", api_key=FILE_KEYS[1], max_retries=0, timeout=30)
    assert list(client.models.list()) == []


def test_no_key_reaches_the_logs(keyed_server) -> None:
    proc, rest, _ = keyed_server
    call(rest, "POST", "/model/add:add_common", WRONG, json=ADD)
    call(rest, "POST", "/model/add:add_common", FILE_KEYS[0], json=ADD)
    call(rest, "POST", "/model/add:nomethod", FILE_KEYS[0], json=ADD)  # an error logged with the key in the request
    logs = proc.log() + "".join(p.read_text(errors="replace") for p in Path(proc.log_path.parent).rglob("*.log"))
    assert "API key(s) required" in logs  # the log is there (and says keys are on)
    for key in (*FILE_KEYS, ENV_KEY, WRONG):
        assert key not in logs
