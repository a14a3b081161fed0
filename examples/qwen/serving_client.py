"""Ask the Qwen2.5-VL servable about a generated picture, over REST and over ZMQ.

    python serving_client.py [--prompt "..."] [--image file.png] [--max-new-tokens 32]
"""

import argparse
import base64
import io
import json
import urllib.request

import numpy as np

from servable_framework.client import Client


def demo_image() -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (96, 64), "white")
    ImageDraw.Draw(img).rectangle([20, 12, 70, 52], fill="red")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def ask_rest(prompt, image, max_new_tokens, url="http://127.0.0.1:1500/model/qwen:predict"):
    body = {"instances": [{"prompt": prompt, "image": {"b64": base64.b64encode(image).decode()},
                           "max_new_tokens": max_new_tokens}]}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:  # error bodies keep the contract's shape
        return json.loads(err.read())


def ask_zmq(prompt, image, max_new_tokens, address="127.0.0.1:5500"):
    with Client(address, "qwen", "predict", timeout_s=300) as client:
        return client.infer({"prompt": prompt, "image": image, "max_new_tokens": np.int32(max_new_tokens)})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="What is in this picture?")
    parser.add_argument("--image", help="a PNG/JPEG file (default: a generated red square)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    a = parser.parse_args()
    if a.image:
        with open(a.image, "rb") as f:
            image = f.read()
    else:
        image = demo_image()
    print("REST:", ask_rest(a.prompt, image, a.max_new_tokens))
    print("ZMQ: ", ask_zmq(a.prompt, image, a.max_new_tokens))
