"""Baseline for bench_add.py's distributed MatMul: the same ``y = -(x @ W)`` in ONE process, no Agents.

    python bench/_bare_matmul_app.py PORT SHARD.safetensors [SHARD.safetensors ...]

Loads the column shards of ``W`` the Agents load (safetensors, key ``w``), joins them, and answers
``POST /model/matmul:predict`` with the framework's JSON shapes (``{"instances": [{"x": [[..]]}]}`` ->
``{"instances": [{"y": [[..]]}]}``); ``GET /ready`` answers 200. float32 matmul inline on the event loop; uvicorn
with Main's own settings (`servable_framework.main.http.UVICORN_OPTIONS`, one process).
"""

import sys
from pathlib import Path

import numpy as np
import torch
import uvicorn
from safetensors.torch import load_file
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root
from servable_framework.main.http import UVICORN_OPTIONS

torch.set_num_threads(1)
W = torch.cat([load_file(path)["w"] for path in sys.argv[2:]], dim=1).to(torch.float32)


async def predict(request: Request) -> JSONResponse:
    body = await request.json()
    out = []
    with torch.inference_mode():
        for inst in body["instances"]:
            x = torch.from_numpy(np.asarray(inst["x"], dtype=np.float32))
            out.append({"y": (-(x @ W)).numpy().tolist()})
    return JSONResponse({"instances": out})


async def ready(_: Request) -> JSONResponse:
    return JSONResponse({"ready": True})


app = Starlette(routes=[Route("/model/matmul:predict", predict, methods=["POST"]),
                        Route("/ready", ready, methods=["GET"])])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), workers=1, **UVICORN_OPTIONS)
