"""GPU readiness: the tiny Qwen2.5-VL served on CUDA Agents matches the unsharded Hugging Face model.

Marked ``gpu``: skipped where ``torch.cuda.is_available()`` is False (tests/conftest.py); ``scripts/gpu_check``
runs them. examples/qwen's server and Agents start as documented, with the rank table's devices (TP 1:
cuda:0; TP 2, only with two GPUs: cuda:0 and cuda:1); the Agents must form an nccl group. The reference is
the unsharded model's greedy ``generate()`` on the CPU in float32 (the checkpoint's dtype, which the Agents
keep); the tiny model's greedy tokens are well separated (servables/qwen/tiny_model.py), so the answers
must be equal text, alone, batched, with an image.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration.test_qwen_servable import png, tiny_ckpt  # noqa: F401  (fixture)
from tests.support.procs import REPO, Rest, child_env, free_port

pytestmark = pytest.mark.gpu

Reference = Callable[[str, bytes | None, int], str]


@pytest.fixture(scope="module")
def reference(tiny_ckpt: Path) -> Reference:  # noqa: F811
    """Greedy text of the unsharded HF model on the CPU (float32), with the stock processor calls."""
    import torch
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    from servables.qwen.vision_compat import load_processor

    processor = load_processor(str(tiny_ckpt))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_ckpt)).eval()

    def generate(prompt: str, image: bytes | None, n: int) -> str:
        pic = Image.open(io.BytesIO(image)).convert("RGB") if image else None
        content = [{"type": "image", "image": pic}] if pic else []
        messages = [{"role": "user", "content": [*content, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=[pic] if pic else None, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
        return str(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))

    return generate


def gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def served(request: pytest.FixtureRequest, module_servers, tiny_ckpt: Path) -> Iterator[tuple[Rest, str]]:  # noqa: F811
    """examples/qwen's server + Agents at TP ``param`` on CUDA; (REST, the Agents' log)."""
    tp = int(request.param)
    if gpus() < tp:
        pytest.skip(f"TP {tp} needs {tp} GPUs, {gpus()} visible")
    rest_port, zmq_port, dist = free_port(), free_port(), f"127.0.0.1:{free_port()}"
    example = REPO / "examples" / "qwen"
    env = child_env(QWEN_MAX_BATCH_DELAY_MS="100")
    server = module_servers.start(["serving_server.py", "--checkpoint", str(tiny_ckpt), "--tp", str(tp), "--rest",
                                   f"127.0.0.1:{rest_port}", "--zmq", f"127.0.0.1:{zmq_port}",
                                   "--distributed-address", dist], f"gpu-server-tp{tp}", cwd=example, env=env)
    agents = module_servers.start(["serving_agent.py", "--rank-start", "0", "--checkpoint", str(tiny_ckpt),
                                   "--distributed-address", dist], f"gpu-agents-tp{tp}", cwd=example, env=env)
    rest = Rest(rest_port)
    try:
        rest.wait_ready(server, 240)
        yield rest, agents.log()
    finally:
        rest.close()
        agents.stop()
        server.stop()


def texts(rest: Rest, instances: list[dict]) -> list[str]:
    r = rest.post("/model/qwen:predict", {"instances": instances})
    assert r.status_code == 200, r.text
    return [i["text"] for i in r.json()["instances"]]


def test_agents_form_an_nccl_group_on_their_devices(served: tuple[Rest, str]) -> None:
    _, log = served
    joined = [line for line in log.splitlines() if "joined the" in line]
    assert joined and all("joined the nccl group" in line for line in joined), log[-3000:]


def test_text_matches_the_unsharded_model(served: tuple[Rest, str], reference: Reference) -> None:
    rest, _ = served
    prompts, lengths = ["Hello, world!", "Describe a red square.", "The quick brown fox"], [12, 9, 3]
    assert texts(rest, [{"prompt": p, "max_new_tokens": n} for p, n in zip(prompts, lengths)]) == \
        [reference(p, None, n) for p, n in zip(prompts, lengths)]


def test_image_matches_the_unsharded_model(served: tuple[Rest, str], reference: Reference) -> None:
    rest, _ = served
    image = png()
    got = texts(rest, [{"prompt": "What is in this picture?", "image": {"b64": base64.b64encode(image).decode()},
                        "max_new_tokens": 12}])
    assert got == [reference("What is in this picture?", image, 12)]


def test_concurrent_requests_match(served: tuple[Rest, str], reference: Reference) -> None:
    """Requests from several clients at once (batched together, or joining a running batch) keep their answers."""
    rest, _ = served
    asks = [("Tell me about tensors.", 10), ("Hi", 4), ("Count to five", 16), ("What color is the sky?", 7)]
    with ThreadPoolExecutor(len(asks)) as pool:
        got = list(pool.map(lambda a: texts(rest, [{"prompt": a[0], "max_new_tokens": a[1]}])[0], asks))
    assert got == [reference(p, None, n) for p, n in asks]
