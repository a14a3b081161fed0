"""POST /model/qwen:predict for real: Main + Distributed Worker + 2 TP Agents serving the tiny Qwen2.5-VL.

Answers are checked against the unsharded Hugging Face model's own greedy generation of the same prompt.
"""

from __future__ import annotations

import base64
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from servable_framework.client import Client
from tests.support.procs import REPO, Rest, child_env, free_port


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from servables.qwen.tiny_model import build_tiny_qwen

    return build_tiny_qwen(tmp_path_factory.mktemp("tiny"))


def png(color: str = "red", size: tuple[int, int] = (96, 64)) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).rectangle([10, 10, size[0] - 20, size[1] - 10], fill=color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def start_qwen(servers, ckpt: Path, tp: int, stages: int = 1, **env: str):
    """Start examples/qwen's server and agents as documented, on free ports."""
    rest_port, zmq_port, dist_port = free_port(), free_port(), free_port()
    dist = f"127.0.0.1:{dist_port}"
    e = child_env(**env)
    example = REPO / "examples" / "qwen"
    server = servers.start(["serving_server.py", "--checkpoint", str(ckpt), "--tp", str(tp), "--stages", str(stages),
                            "--rest", f"127.0.0.1:{rest_port}", "--zmq", f"127.0.0.1:{zmq_port}",
                            "--distributed-address", dist], f"qwen-server-{tp}x{stages}", cwd=example, env=e)
    agents = servers.start(["serving_agent.py", "--rank-start", "0", "--checkpoint", str(ckpt),
                            "--distributed-address", dist], f"qwen-agents-{tp}x{stages}", cwd=example, env=e)
    rest = Rest(rest_port)
    rest.wait_ready(server, 240)
    return server, agents, rest, f"127.0.0.1:{zmq_port}"


@pytest.fixture(scope="module")
def qwen(module_servers, tiny_ckpt):
    # a generous batch window so that concurrent requests in test_concurrent_requests_are_batched meet
    server, agents, rest, zmq_address = start_qwen(module_servers, tiny_ckpt, tp=2, QWEN_MAX_BATCH_DELAY_MS="100",
                                                   QWEN_CONTINUOUS_BATCHING="1")
    yield server, agents, rest, zmq_address
    rest.close()


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    """Greedy text from the unsharded HF model, prepared with the stock processor calls (not the servable's code)."""
    import torch
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    from servables.qwen.vision_compat import load_processor

    processor = load_processor(str(tiny_ckpt))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_ckpt)).eval()

    def generate(prompt: str, image: bytes | None, n: int) -> str:
        content = [{"type": "image", "image": Image.open(io.BytesIO(image)).convert("RGB")}] if image else []
        messages = [{"role": "user", "content": [*content, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images = [content[0]["image"]] if image else None
        inputs = processor(text=[text], images=images, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
        return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    return generate


def predict(rest: Rest, instances: list[dict]):
    return rest.post("/model/qwen:predict", {"instances": instances})


def test_text_and_image_match_the_unsharded_model(qwen, reference) -> None:
    _, _, rest, _ = qwen
    image = png()
    r = predict(rest, [{"prompt": "What is in this picture?", "image": {"b64": base64.b64encode(image).decode()},
                        "max_new_tokens": 12}])
    assert r.status_code == 200, r.text
    assert r.json()["instances"][0]["text"] == reference("What is in this picture?", image, 12)


def test_text_only_and_several_instances(qwen, reference) -> None:
    _, _, rest, _ = qwen
    prompts = ["Hello, world!", "Describe a red square.", "The quick brown fox"]
    r = predict(rest, [{"prompt": p, "max_new_tokens": n} for p, n in zip(prompts, (5, 9, 3))])
    assert r.status_code == 200, r.text
    texts = [i["text"] for i in r.json()["instances"]]
    assert texts == [reference(p, None, n) for p, n in zip(prompts, (5, 9, 3))]


def test_messages_form(qwen, reference) -> None:
    _, _, rest, _ = qwen
    image = png("blue")
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What color?"}]}]
    r = predict(rest, [{"messages": json.dumps(messages), "max_new_tokens": 6}])
    assert r.status_code == 200, r.text
    assert r.json()["instances"][0]["text"] == reference("What color?", image, 6)


def test_zmq_client_same_answer(qwen) -> None:
    _, _, rest, zmq_address = qwen
    image = png("green")
    via_rest = predict(rest, [{"prompt": "Hi", "image": {"b64": base64.b64encode(image).decode()},
                               "max_new_tokens": 7}]).json()
    with Client(zmq_address, "qwen", "predict", timeout_s=120) as client:
        via_zmq = client.infer({"prompt": "Hi", "image": image, "max_new_tokens": np.int32(7)})
    assert via_zmq == [{"text": via_rest["instances"][0]["text"]}]


def test_sampling_is_seeded(qwen) -> None:
    _, _, rest, _ = qwen
    inst = {"prompt": "Tell me a story", "max_new_tokens": 10, "temperature": 1.5, "top_k": 50, "top_p": 0.95}
    a = predict(rest, [{**inst, "seed": 7}, {**inst, "seed": 7}, {**inst, "seed": 8}]).json()["instances"]
    assert a[0] == a[1]
    # a seed that were ignored (greedy decoding, or one shared generator) would give seed 8 the same text
    assert a[2] != a[0], "a different seed must give a different sample"
    again = predict(rest, [{**inst, "seed": 7}]).json()["instances"][0]
    assert again == a[0]


@pytest.mark.parametrize(("instance", "status", "fragment"), [
    ({"prompt": "hi", "image": {"b64": base64.b64encode(b"this is not an image").decode()}}, 400,
     "'image' is not a valid PNG/JPEG image"),
    ({"prompt": "hi", "image": {"b64": base64.b64encode(png()[:60]).decode()}}, 400,
     "'image' is not a valid PNG/JPEG image"),
    ({"prompt": "hi", "image": {"b64": "iVBORw0KGgoAAAANSUhEUgAAAGAAAABA"[:-3]}}, 400, "is illegal b64 encode string"),
    ({"image": {"b64": base64.b64encode(png()).decode()}}, 400, "missing input: give 'prompt'"),
    ({"prompt": "hi", "max_new_tokens": 100000}, 400, "max_new_tokens 100000 is out of range [1, 512]"),
    ({"prompt": "hi", "temperature": -1.0}, 400, "need temperature >= 0"),
    ({"messages": "not json"}, 400, "'messages' is not valid JSON"),
    ({"messages": json.dumps([{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "file:///etc/passwd"}}]}])}, 400, "image parts must carry a data:image"),
])
def test_bad_requests_get_contract_errors_and_server_keeps_serving(qwen, reference, instance, status,
                                                                     fragment) -> None:
    _, _, rest, _ = qwen
    r = predict(rest, [instance])
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error_msg"} and fragment in r.json()["error_msg"]
    ok = predict(rest, [{"prompt": "Hello, world!", "max_new_tokens": 4}])
    assert ok.json()["instances"][0]["text"] == reference("Hello, world!", None, 4)


def test_bad_instance_among_good_ones(qwen, reference) -> None:
    _, _, rest, _ = qwen
    r = predict(rest, [{"prompt": "Hello, world!", "max_new_tokens": 4}, {"prompt": "x", "max_new_tokens": 0}])
    out = r.json()["instances"]
    assert out[0]["text"] == reference("Hello, world!", None, 4)
    assert "max_new_tokens 0 is out of range" in out[1]["error_msg"]


def batch_counts(rest: Rest) -> tuple[int, int]:
    text = rest.get("/metrics").text
    b = sum(int(float(v)) for v in re.findall(r'^servable_model_batches_total\{[^}]*servable="qwen"[^}]*\} (\S+)', text,
                                              re.M))
    i = sum(int(float(v)) for v in re.findall(r'^servable_model_instances_total\{[^}]*servable="qwen"[^}]*\} (\S+)',
                                              text, re.M))
    return b, i


def test_concurrent_requests_are_batched_and_answers_unchanged(qwen, reference) -> None:
    """Requests from 8 clients are generated together (left padding, per-request stop and length) and each
    answer equals the unbatched reference, in order."""
    from tests.support.procs import wait_until

    _, _, rest, _ = qwen
    wait_until(lambda: "servable_model_batches_total{" in rest.get("/metrics").text, 10, "batch metrics")
    b0, i0 = batch_counts(rest)
    joined0 = joined_batches(rest)
    prompts = [(f"Request number {k}: " + "tell me something. " * (k % 3), 3 + 2 * k) for k in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: predict(rest, [{"prompt": p[0], "max_new_tokens": p[1]}]), prompts))
    for (prompt, n), r in zip(prompts, answers):
        assert r.status_code == 200, r.text
        assert r.json()["instances"][0]["text"] == reference(prompt, None, n)
    wait_until(lambda: batch_counts(rest)[1] >= i0 + 8, 10, "metrics to count the 8 instances")
    b1, i1 = batch_counts(rest)
    assert i1 - i0 == 8
    # together: fewer Worker batches than requests, or (continuous batching) batches joined on the Agents
    assert b1 - b0 < 8 or joined_batches(rest) > joined0, f"no two requests ran together ({b1 - b0} batches)"


def test_pipeline_stages_give_the_same_answers(servers, tiny_ckpt, reference) -> None:
    """stage_size=2 x TP=2 (4 Agents): REST and ZMQ answers equal the unsharded model's, as with TP only."""
    _, _, rest, zmq_address = start_qwen(servers, tiny_ckpt, tp=2, stages=2)
    image = png("yellow")
    r = predict(rest, [{"prompt": "What is in this picture?", "image": {"b64": base64.b64encode(image).decode()},
                        "max_new_tokens": 10}, {"prompt": "Hello, world!", "max_new_tokens": 6}])
    assert r.status_code == 200, r.text
    texts = [i["text"] for i in r.json()["instances"]]
    assert texts == [reference("What is in this picture?", image, 10), reference("Hello, world!", None, 6)]
    with Client(zmq_address, "qwen", "predict", timeout_s=120) as client:
        via_zmq = client.infer({"prompt": "Hello, world!", "max_new_tokens": np.int32(6)})
    assert via_zmq == [{"text": texts[1]}]
    rest.close()


def test_finished_request_leaves_the_batch_early(qwen, reference) -> None:
    """A short request batched with a long one is answered when it is done, not when the batch is."""
    import threading

    from tests.support.procs import wait_until

    _, _, rest, _ = qwen
    wait_until(lambda: "servable_model_batches_total{" in rest.get("/metrics").text, 10, "batch metrics")
    b0, i0 = batch_counts(rest)
    joined0 = joined_batches(rest)
    done: list[str] = []
    texts: dict[str, str] = {}

    def ask(name: str, prompt: str, n: int) -> None:
        texts[name] = predict(rest, [{"prompt": prompt, "max_new_tokens": n}]).json()["instances"][0]["text"]
        done.append(name)

    long = threading.Thread(target=ask, args=("long", "Tell me everything.", 200))
    short = threading.Thread(target=ask, args=("short", "Hello, world!", 2))
    long.start()
    # the short one only once Main has the long one: sent together, on a busy host the short one could be done
    # before the long one even arrived (a CI run saw that), and they would not have run together
    wait_until(lambda: inflight(rest) >= 1, 30, "the long request to be in flight")
    short.start()
    long.join(120)
    short.join(120)
    wait_until(lambda: batch_counts(rest)[1] >= i0 + 2, 10, "metrics")
    b1, i1 = batch_counts(rest)
    # together: one Worker batch, or (continuous batching: the Worker sends at once) one joined the other's loop
    assert b1 - b0 == 1 or joined_batches(rest) > joined0, "the two requests did not run together"
    assert done == ["short", "long"]
    assert texts["short"] == reference("Hello, world!", None, 2)
    assert texts["long"] == reference("Tell me everything.", None, 200)


def inflight(rest: Rest) -> float:
    """Main's `servable_requests_inflight`: requests admitted and not answered yet."""
    found = re.search(r"^servable_requests_inflight (\S+)", rest.get("/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


def joined_batches(rest: Rest) -> int:
    text = rest.get("/metrics").text
    return sum(int(float(v)) for v in re.findall(
        r'^servable_model_batches_joined_total\{[^}]*servable="qwen"[^}]*\} (\S+)', text, re.M))


def test_request_arriving_mid_decode_joins_the_running_batch(qwen, reference) -> None:
    """Continuous batching: requests sent while a long generation runs are taken into its decode loop
    (the Agents report the join) and answered before it ends; every answer equals the unbatched model's."""
    import threading

    from tests.support.procs import wait_until

    _, _, rest, _ = qwen
    wait_until(lambda: "servable_model_batches_joined_total{" in rest.get("/metrics").text, 10, "join metrics")
    joined0 = joined_batches(rest)
    long_text: list[str] = []
    long = threading.Thread(target=lambda: long_text.append(
        predict(rest, [{"prompt": "Tell me a long story.", "max_new_tokens": 400}]).json()["instances"][0]["text"]))
    long.start()
    shorts: list[tuple[str, str, bool]] = []  # (prompt, answer, answered while the long one still ran)
    for k in range(30):
        if not long.is_alive():
            break
        prompt = f"Short question {k}?"
        r = predict(rest, [{"prompt": prompt, "max_new_tokens": 3}])
        assert r.status_code == 200, r.text
        shorts.append((prompt, r.json()["instances"][0]["text"], long.is_alive()))
    long.join(120)
    assert long_text == [reference("Tell me a long story.", None, 400)]
    for prompt, answer, _ in shorts:
        assert answer == reference(prompt, None, 3)
    assert sum(early for _, _, early in shorts) >= 2, f"short requests waited for the long one: {shorts}"
    wait_until(lambda: joined_batches(rest) > joined0, 10, "the Agents to report a joined batch")


def cancelled_instances(rest: Rest, when: str) -> int:
    text = rest.get("/metrics").text
    return sum(int(float(v)) for v in re.findall(
        r'^servable_model_instances_cancelled_total\{[^}]*servable="qwen"[^}]*when="' + when + r'"[^}]*\} (\S+)',
        text, re.M))


@pytest.mark.parametrize("how", ["deadline", "client_hangs_up"])
def test_abandoned_generation_is_stopped_on_the_agents(qwen, reference, how) -> None:
    """A request whose deadline passes (504 at once), or whose REST client hangs up, is cancelled: the Agents
    stop generating it at the next step (the output rank reports the stop) instead of running all its tokens
    for nobody."""
    import httpx

    from tests.support.procs import wait_until

    _, _, rest, _ = qwen
    wait_until(lambda: "servable_model_instances_cancelled_total{" in rest.get("/metrics").text, 10, "metrics")
    stopped0 = cancelled_instances(rest, "running")
    # 512 tokens take seconds here; 1.5 s is well past the prefill and well before the end
    body = {"instances": [{"prompt": "Tell me a long story.", "max_new_tokens": 512}]}
    if how == "deadline":
        r = rest.post("/model/qwen:predict", body, headers={"X-Request-Timeout-S": "1.5"})
        assert r.status_code == 504 and "timed out" in r.json()["error_msg"], r.text
    else:
        with httpx.Client(base_url=rest.base, timeout=1.5) as impatient, pytest.raises(httpx.ReadTimeout):
            impatient.post("/model/qwen:predict", json=body)  # gives up and closes the connection
    # without the stop the 512 tokens run to the end and the counter never moves
    wait_until(lambda: cancelled_instances(rest, "running") == stopped0 + 1, 30, "the output rank to stop the row")
    r = predict(rest, [{"prompt": "Hello, world!", "max_new_tokens": 5}])  # the ranks are still in step
    assert r.status_code == 200 and r.json()["instances"][0]["text"] == reference("Hello, world!", None, 5)


def test_image_over_the_pixel_cap_is_refused_before_decoding(qwen) -> None:
    _, _, rest, _ = qwen
    huge = png("white", (4100, 4100))  # 16.8 Mpx, over the default cap of 4096 x 4096; a small file
    r = predict(rest, [{"prompt": "hi", "image": {"b64": base64.b64encode(huge).decode()}}])
    assert r.status_code == 400, r.text
    assert "'image' is 4100x4100 = 16810000 pixels, over this server's cap of 16777216" in r.json()["error_msg"]


def test_image_over_max_pixels_is_resized_like_the_reference(qwen, reference) -> None:
    _, _, rest, _ = qwen
    large = png("purple", (400, 300))  # 120,000 px, ~10x the tiny processor's max_pixels (12,544)
    r = predict(rest, [{"prompt": "What is this?", "image": {"b64": base64.b64encode(large).decode()},
                        "max_new_tokens": 6}])
    assert r.status_code == 200, r.text
    assert r.json()["instances"][0]["text"] == reference("What is this?", large, 6)


def test_prompt_over_the_context_is_refused_before_the_agents(qwen) -> None:
    _, _, rest, _ = qwen
    prompt = "hello " * 1900  # ~1,900 tokens: fits the tiny model's 2,048 alone, not with 512 new tokens
    r = predict(rest, [{"prompt": prompt, "max_new_tokens": 512}])
    assert r.status_code == 400, r.text
    assert re.search(r"the prompt is \d+ tokens and max_new_tokens is 512: \d+ is over the model's context of "
                     r"2048 tokens", r.json()["error_msg"]), r.text
    ok = predict(rest, [{"prompt": "Hello, world!", "max_new_tokens": 3}])
    assert ok.status_code == 200, ok.text
