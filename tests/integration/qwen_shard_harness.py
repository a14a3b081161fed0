"""One rank of a Qwen2.5-VL shard run, started as a real OS process by test_qwen_shard_numeric.py.

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p \
        python tests/integration/qwen_shard_harness.py --ckpt DIR --stage-size S --spec SPEC.json --out OUT_DIR

It does what the Agent runtime does (gloo process group over all ranks, one ``dist.new_group`` per
stage in stage order on every rank, a `ShardContext`), builds ``Qwen25VLShard`` and runs the
scenarios of SPEC.json in order on every rank. SPEC.json::

    {"inputs": "inputs.npz",            # arrays "<prompt>/input_ids", "<prompt>/pixel_values", "<prompt>/image_grid_thw"
     "scenarios": [{"name": "batch", "api": "generate" | "predict", "eos": null | [ids],
                    "instances": [{"prompt": "img", "sampling": [5 numbers]}, ...]}, ...]}

Stage-0 ranks get the instances, the others ``None``. The output rank writes OUT_DIR/result.npz
(``<scenario>/<i>/tokens``, ``<scenario>/<i>/logits``, ``<scenario>/<i>/reason``, ``<scenario>/error``);
every rank writes OUT_DIR/rank<r>.json (what it holds, what it returned).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

T_START = time.perf_counter()
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--stage-size", type=int, required=True)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    tp = world // args.stage_size
    tp_group = None
    for stage in range(args.stage_size):  # every rank creates every stage's group, in order
        group = dist.new_group(list(range(stage * tp, (stage + 1) * tp))) if tp > 1 else None
        if stage == rank // tp:
            tp_group = group

    from agents.qwen2_5_vl import Qwen25VLShard
    from servable_framework.agent.shard import ShardContext

    timings = {"imports_and_init_s": time.perf_counter() - T_START}

    def make_shard(eos):
        options = {} if eos is None else {"eos_token_id": eos}
        ctx = ShardContext(rank=rank, rank_size=world, stage_size=args.stage_size, model_files=[args.ckpt],
                           device=torch.device("cpu"), tp_group=tp_group, options=options)
        return ctx, Qwen25VLShard(ctx)

    spec = json.loads(Path(args.spec).read_text())
    inputs = np.load(spec["inputs"])
    shards: dict[str, tuple] = {}
    results: dict[str, np.ndarray] = {}
    report: dict = {"rank": rank, "returned": {}}
    for scenario in spec["scenarios"]:
        key = json.dumps(scenario.get("eos"))
        if key not in shards:
            shards[key] = make_shard(scenario.get("eos"))
        ctx, shard = shards[key]
        name = scenario["name"]
        instances = None
        if ctx.is_first_stage:
            instances = []
            for inst in scenario["instances"]:
                p = inst["prompt"]
                instances.append([inputs[f"{p}/input_ids"], inputs[f"{p}/pixel_values"],
                                  inputs[f"{p}/image_grid_thw"], np.asarray(inst["sampling"], dtype=np.float64)])
        try:
            if scenario.get("api") == "predict":
                out = shard.predict(instances)
                report["returned"][name] = None if out is None else [
                    [[str(v.dtype), list(v.shape)] for v in values] for values in out]
                if out is not None:
                    for i, values in enumerate(out):
                        results[f"{name}/{i}/tokens"] = values[0]
            else:
                res = shard.generate(instances, collect_logits=True)
                report["returned"][name] = None if res is None else "GenerationResult"
                if res is not None:
                    for i, tokens in enumerate(res.tokens):
                        results[f"{name}/{i}/tokens"] = np.asarray(tokens, dtype=np.int64)
                        results[f"{name}/{i}/logits"] = res.logits[i]
                        results[f"{name}/{i}/reason"] = np.array(res.finish_reasons[i])
        except ValueError as exc:  # a rejected request: every rank must get here, then go on in step
            report["returned"][name] = f"ValueError: {exc}"
            if ctx.is_output_rank:
                results[f"{name}/error"] = np.array(str(exc))

    timings["total_s"] = time.perf_counter() - T_START
    report["timings"] = {k: round(v, 2) for k, v in timings.items()}
    ctx, shard = shards[json.dumps(None)]
    held = dict(shard.tensors())
    report.update(
        stage=ctx.stage, tp_rank=ctx.tp_rank, layers=list(shard.layers),
        has_visual=shard.visual is not None, has_lm_head=shard.lm_head is not None,
        n_params=sum(t.numel() for n, t in held.items() if "rotary" not in n),
        shapes={n: list(t.shape) for n, t in held.items() if n.startswith("text.layers.0.")},
    )
    out_dir = Path(args.out)
    if ctx.is_output_rank:
        np.savez(out_dir / "result.npz", **results)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    for _, s in shards.values():
        s.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
