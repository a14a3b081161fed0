"""In-process baseline for bench_qwen.py: the Qwen2.5-VL shard's decode loop without any serving.

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p \
        python bench/_qwen_inproc.py --ckpt DIR --prompt TEXT --tokens 1 32 --repeats 7 --out OUT.json

One process per rank (gloo, like the Agents; n = TP size, one stage; the TP collectives and the per-step plan
through shared memory, as the Agents' on one host), one torch thread each (the Agents' default). Each rank builds
``Qwen25VLShard`` with a `ShardContext` and runs, per repeat and per token count, the same work as one served
request: the servable's own ``preprocess`` (chat template, vision info, processor; imported from
servables/qwen/servable_config.py), ``shard.generate`` (greedy; ``--batch B``: B copies in one call) and the
servable's ``postprocess`` (decode, first instance). Rank 0 times the whole (``e2e_s``) and ``generate`` alone
(``model_s``) and writes OUT.json with token counts, stop reasons, texts.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def demo_image() -> bytes:
    """The picture examples/qwen/serving_client.py sends (a red square on white, 96x64 PNG)."""
    sys.path.insert(0, str(REPO / "examples" / "qwen"))
    from serving_client import demo_image as example_image

    return example_image()


def load_servable_functions():
    """``preprocess`` / ``postprocess`` of the qwen servable (imported under a declaration builder)."""
    from servable_framework.servable.declare import ServableBuilder

    with ServableBuilder("qwen", str(REPO / "servables")).active():
        module = importlib.import_module("servables.qwen.servable_config")
    return module.preprocess, module.postprocess


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--tokens", type=int, nargs="+", required=True)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1, help="instances per generate() call (copies of one)")
    ap.add_argument("--no-image", action="store_true", help="text-only prompt")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    import numpy as np
    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(os.environ.get("SERVABLE_AGENT_THREADS", "1")))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    tp_group = dist.new_group(list(range(world))) if world > 1 else None

    from agents.qwen2_5_vl import Qwen25VLShard
    from servable_framework.agent.shard import ShardContext
    from servable_framework.engine.collectives import HostComm, host_comm_supported

    os.environ["QWEN_CHECKPOINT"], os.environ["QWEN_RANK_SIZE"] = a.ckpt, str(world)
    preprocess, postprocess = load_servable_functions()
    comm = host = None  # the collectives the Agents use on one host (shared memory), so only serving differs
    if tp_group is not None and host_comm_supported(torch.device("cpu")):
        store = dist.distributed_c10d._get_default_store()
        comm = HostComm.connect(store, "tp", tp_group, world, rank, 120.0)
        host = HostComm.connect(store, "world", None, world, rank, 120.0)
    ctx = ShardContext(rank=rank, rank_size=world, stage_size=1, model_files=[a.ckpt],
                       device=torch.device("cpu"), tp_group=tp_group, comm=comm, host_comm=host)
    shard = Qwen25VLShard(ctx)
    image = None if a.no_image else demo_image()  # bytes: what the Worker gets over ZMQ, or REST b64

    def one(n: int) -> tuple[float, float, dict]:
        dist.barrier()
        t0 = time.perf_counter()
        batch = [list(preprocess(a.prompt, image, None, np.array([n]), None, None, None, None))
                 for _ in range(a.batch)]
        t1 = time.perf_counter()
        res = shard.generate(batch)
        t2 = time.perf_counter()
        info = {}
        if res is not None:
            tokens = res.tokens[0]
            info = {"n_tokens": len(tokens), "reason": res.finish_reasons[0], "text": postprocess(tokens)}
        return time.perf_counter() - t0, t2 - t1, info

    results = {}
    for n in a.tokens:
        for _ in range(a.warmup):
            one(n)
        runs = [one(n) for _ in range(a.repeats)]
        results[str(n)] = {"e2e_s": [r[0] for r in runs], "model_s": [r[1] for r in runs], **runs[-1][2]}
    if rank == 0:
        Path(a.out).write_text(json.dumps({"world_size": world, "batch": a.batch, "results": results}))
    shard.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
