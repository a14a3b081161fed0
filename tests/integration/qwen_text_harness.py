"""One rank process of Qwen2.5 text-only shard runs, started as a real OS process by test_qwen_text_numeric.py.

    RANK=r python tests/integration/qwen_text_harness.py --plan PLAN.json --out OUT_DIR

PLAN.json lists parallel layouts and the scenarios to run in each::

    {"layouts": [{"name": "tp2", "world": 2, "stage_size": 1, "ckpt": DIR, "port": 29500}, ...],
     "inputs": "inputs.npz",  # one int array "<prompt>" of token ids per prompt
     "scenarios": [{"name": "batch", "api": "generate" | "predict", "eos": null | [ids],
                    "instances": [{"prompt": "hello", "sampling": [5 numbers]}, ...],
                    "joins": [{"at": 3, "instances": [...]}, ...]}, ...]}

``joins`` scripts continuous batching with the VL harness's `ScriptedLink` (batch ids 2, 3, ... in list order;
the scenario's own batch is id 1). As there, one set of processes runs the layouts one after another: for each
layout the ranks ``< world`` do what the Agent runtime does (a fresh gloo default process group, one
``dist.new_group`` per stage in stage order on every rank, a `ShardContext`), build ``Qwen2Shard``, run every
scenario in order (stage-0 ranks get the instances, the others ``None``) and destroy the group again; ranks
``>= world`` sit that layout out. Per layout the output rank writes OUT_DIR/<layout>/result.npz
(``<scenario>/<i>/tokens``, ``.../logits``, ``.../reason``, ``<scenario>/error``, ``<scenario>/b<id>/...``)
and every rank writes OUT_DIR/<layout>/rank<r>.json (what it holds, what each call returned, timings).

Multi-host runs (ranks in different network namespaces) add two optional layout keys: ``"master_addr"`` (the
rendezvous host, rank 0's address; default 127.0.0.1) and ``"rank_hosts"`` (rank r's own address). With
``rank_hosts``, each rank binds gloo to the interface holding its address exactly as an Agent does
(`servable_framework.agent.agent.bind_collectives`) and records under ``"collectives"`` in rank<r>.json its
address, the interface, ``GLOO_SOCKET_IFNAME`` and its own established TCP connections (taken before the group
is destroyed), so a test can see that the collectives crossed hosts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

T_START = time.perf_counter()
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tests.integration.qwen_shard_harness import ScriptedLink as _VLScriptedLink  # noqa: E402


class ScriptedLink(_VLScriptedLink):
    """The VL harness's scripted `BatchLink`, with whatever this one needs beyond it."""

    def progress(self) -> None:  # the engine reports each step (the Agent's step-timeout watch)
        pass


def run_layout(rank: int, layout: dict[str, Any], plan: dict[str, Any], out_dir: Path) -> None:
    from agents.qwen2 import Qwen2Shard
    from servable_framework.agent.shard import ShardContext

    t0 = time.perf_counter()
    world, stage_size = layout["world"], layout["stage_size"]
    collectives: dict[str, Any] | None = None
    if "rank_hosts" in layout:  # another host per rank: listen where the peers look for this rank, as Agents do
        from servable_framework.agent.agent import bind_collectives

        host = layout["rank_hosts"][rank]
        collectives = {"host": host, "iface": bind_collectives(host)}
    master = layout.get("master_addr", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"tcp://{master}:{layout['port']}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    tp = world // stage_size
    tp_group = None
    for stage in range(stage_size):  # every rank creates every stage's group, in order
        group = dist.new_group(list(range(stage * tp, (stage + 1) * tp))) if tp > 1 else None
        if stage == rank // tp:
            tp_group = group

    def make_shard(eos: list[int] | None) -> tuple[ShardContext, Any]:
        options = {} if eos is None else {"eos_token_id": eos}
        ctx = ShardContext(rank=rank, rank_size=world, stage_size=stage_size, model_files=[layout["ckpt"]],
                           device=torch.device("cpu"), tp_group=tp_group, options=options)
        return ctx, Qwen2Shard(ctx)

    inputs = np.load(plan["inputs"])

    def make_instances(spec: list[dict[str, Any]]) -> list[list[np.ndarray]]:
        return [[inputs[inst["prompt"]], np.asarray(inst["sampling"], dtype=np.float64)] for inst in spec]

    shards: dict[str, tuple[ShardContext, Any]] = {}
    results: dict[str, np.ndarray] = {}
    report: dict[str, Any] = {"rank": rank, "returned": {}}
    for scenario in plan["scenarios"]:
        key = json.dumps(scenario.get("eos"))
        if key not in shards:
            shards[key] = make_shard(scenario.get("eos"))
        ctx, shard = shards[key]
        name = scenario["name"]
        instances = make_instances(scenario["instances"]) if ctx.is_first_stage else None
        link = ScriptedLink(scenario["joins"], make_instances, ctx.is_first_stage, scenario.get("cancels", [])) \
            if "joins" in scenario else None
        shard.link = link
        try:
            if scenario.get("api") == "predict":
                out = shard.predict(instances)
                report["returned"][name] = None if out is None else [
                    [[str(v.dtype), list(v.shape)] for v in values] for values in out]
                for i, values in enumerate(out or []):
                    results[f"{name}/{i}/tokens"] = values[0]
            else:
                res = shard.generate(instances, collect_logits=True)
                report["returned"][name] = None if res is None else "GenerationResult"
                if res is not None:
                    for i, tokens in enumerate(res.tokens):
                        results[f"{name}/{i}/tokens"] = np.asarray(tokens, dtype=np.int64)
                        results[f"{name}/{i}/logits"] = res.logits[i]
                        results[f"{name}/{i}/reason"] = np.array(res.finish_reasons[i])
                if link is not None:
                    report.setdefault("joined", {})[name] = {
                        "completed": sorted(link.completed), "failed": link.failed, "left": len(link.waiting),
                        "stopped": link.stops}
                    for bid, joined in shard.last_results.items() if res is not None else ():
                        for i, tokens in enumerate(joined.tokens):
                            results[f"{name}/b{bid}/{i}/tokens"] = np.asarray(tokens, dtype=np.int64)
                            results[f"{name}/b{bid}/{i}/logits"] = joined.logits[i]
                    for bid, text in link.failed.items():
                        if ctx.is_output_rank:
                            results[f"{name}/b{bid}/error"] = np.array(text)
        except ValueError as exc:  # a rejected request: every rank must get here, then go on in step
            report["returned"][name] = f"ValueError: {exc}"
            if ctx.is_output_rank:
                results[f"{name}/error"] = np.array(str(exc))
        finally:
            shard.link = None

    ctx, shard = shards[json.dumps(None)]
    model = shard.model
    held = dict(model.tensors())
    report.update(
        stage=ctx.stage, tp_rank=ctx.tp_rank, layers=list(model.layers),
        has_embed=model.embed is not None, has_lm_head=model.lm_head is not None,
        vocab_size=model.vocab_size,
        head_shape=list(model.lm_head.weight.shape) if model.lm_head is not None else None,
        shapes={n: list(t.shape) for n, t in held.items() if n.startswith("decoder.0.")},
        held=sorted(held),
        seconds=round(time.perf_counter() - t0, 2),
    )
    if collectives is not None:  # the group's sockets are still open here
        from tests.support.netns import connections

        report["collectives"] = {**collectives, "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME"),
                                 "connections": connections(os.getpid())}
    layout_dir = out_dir / layout["name"]
    layout_dir.mkdir(parents=True, exist_ok=True)
    if ctx.is_output_rank:
        np.savez(layout_dir / "result.npz", **results)
    (layout_dir / f"rank{rank}.json").write_text(json.dumps(report))
    for _, s in shards.values():
        s.close()
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the Agent runtime does
    rank = int(os.environ["RANK"])
    plan = json.loads(Path(args.plan).read_text())
    import agents.qwen2  # noqa: F401  (the expensive imports, timed once)

    timings = {"imports_s": round(time.perf_counter() - T_START, 2)}
    for layout in plan["layouts"]:
        if rank < layout["world"]:
            run_layout(rank, layout, plan, Path(args.out))
    timings["total_s"] = round(time.perf_counter() - T_START, 2)
    (Path(args.out) / f"timings{rank}.json").write_text(json.dumps(timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
