"""Baseline for bench_add.py: the tensor_add model served by a bare Starlette app in ONE process.

    python bench/_bare_add_app.py MODEL.pt2 PORT

Loads the exported program with ``torch.export.load`` and answers ``POST /model/add:add_common`` with the
same JSON shapes as the framework (``{"instances": [{"x1": [[..]], "x2": [[..]]}]}`` ->
``{"instances": [{"y": [[..]]}]}``); ``GET /ready`` answers 200 once the model is loaded. The model runs
inline on the event loop (it takes microseconds); no validation beyond what numpy/torch do. uvicorn runs with
Main's own settings (`servable_framework.main.http.UVICORN_OPTIONS`: event loop, HTTP parser, log level,
keep-alive; one process).
"""

import sys
from pathlib import Path

import numpy as np
import torch
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root
from servable_framework.main.http import UVICORN_OPTIONS

torch.set_num_threads(1)
model = torch.export.load(sys.argv[1]).module()


async def add_common(request: Request) -> JSONResponse:
    body = await request.json()
    out = []
    with torch.inference_mode():
        for inst in body["instances"]:
            x1 = torch.from_numpy(np.asarray(inst["x1"], dtype=np.float32))
            x2 = torch.from_numpy(np.asarray(inst["x2"], dtype=np.float32))
            out.append({"y": model(x1, x2).numpy().tolist()})
    return JSONResponse({"instances": out})


async def ready(_: Request) -> JSONResponse:
    return JSONResponse({"ready": True})


app = Starlette(routes=[Route("/model/add:add_common", add_common, methods=["POST"]),
                        Route("/ready", ready, methods=["GET"])])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), workers=1, **UVICORN_OPTIONS)
