"""The main job, end to end: serve Qwen2.5-VL over 2 tensor-parallel Agents, ask about a picture, print the answer.

    python examples/qwen/demo.py                        # the tiny offline model (no network needed)
    python examples/qwen/demo.py --checkpoint DIR       # a real Hugging Face Qwen2.5-VL checkpoint
    python examples/qwen/demo.py --tp 2 --stages 2      # 4 Agents: 2 pipeline stages x 2 TP ranks

It starts serving_server.py and serving_agent.py as separate processes (on free ports), waits for /ready,
sends one text + image request over REST and the same over ZMQ, prints both answers, and stops everything.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.realpath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url, procs, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"a serving process exited early (code {p.returncode}); see the logs above")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"not ready within {timeout_s} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="Hugging Face Qwen2.5-VL checkpoint directory (default: tiny offline)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--stages", type=int, default=1)
    parser.add_argument("--prompt", default="What is in this picture?")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.checkpoint:
        from servables.qwen.tiny_model import build_tiny_qwen

        print("building the tiny offline Qwen2.5-VL checkpoint ...", flush=True)
        args.checkpoint = str(build_tiny_qwen(os.path.join(REPO, "tiny_models")))
    rest, zmq, dist = (f"127.0.0.1:{free_port()}" for _ in range(3))
    ckpt = ["--checkpoint", args.checkpoint]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen([sys.executable, "serving_server.py", *ckpt, "--tp", str(args.tp), "--stages",
                               str(args.stages), "--rest", rest, "--zmq", zmq, "--distributed-address", dist],
                              cwd=HERE, env=env)
    agents = subprocess.Popen([sys.executable, "serving_agent.py", "--rank-start", "0", *ckpt,
                               "--distributed-address", dist], cwd=HERE, env=env)
    try:
        t0 = time.monotonic()
        wait_ready(f"http://{rest}/ready", [server, agents], 600)
        print(f"\nserver ready in {time.monotonic() - t0:.1f} s: REST {rest}, ZMQ {zmq}, "
              f"{args.tp * args.stages} Agents\n", flush=True)
        from serving_client import ask_rest, ask_zmq, demo_image

        image = demo_image()
        t0 = time.monotonic()
        answer = ask_rest(args.prompt, image, args.max_new_tokens, url=f"http://{rest}/model/qwen:predict")
        print(f"REST answer ({time.monotonic() - t0:.2f} s): {answer}")
        t0 = time.monotonic()
        answer_zmq = ask_zmq(args.prompt, image, args.max_new_tokens, address=zmq)
        print(f"ZMQ answer  ({time.monotonic() - t0:.2f} s): {answer_zmq}")
        ok = "instances" in answer and "text" in answer["instances"][0]
        if not ok:
            raise SystemExit("the request failed")
        print("\n(the tiny model has random weights: its text is gibberish; pass --checkpoint for a real model)"
              if "tiny_models" in args.checkpoint else "")
    finally:
        server.send_signal(signal.SIGTERM)  # Main drains, stops its Worker, which tells the Agents to exit
        for p in (server, agents):
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
