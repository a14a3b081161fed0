"""One rank process of Qwen2.5-VL shard runs, started as a real OS process by test_qwen_shard_numeric.py.

    RANK=r python tests/integration/qwen_shard_harness.py --plan PLAN.json --out OUT_DIR

PLAN.json lists parallel layouts and the scenarios to run in each::

    {"layouts": [{"name": "tp2", "world": 2, "stage_size": 1, "ckpt": DIR, "port": 29500}, ...],
     "inputs": "inputs.npz",  # arrays "<prompt>/input_ids", "<prompt>/pixel_values", "<prompt>/image_grid_thw"
     "scenarios": [{"name": "batch", "api": "generate" | "predict", "eos": null | [ids],
                    "instances": [{"prompt": "img", "sampling": [5 numbers]}, ...],
                    "joins": [{"at": 3, "instances": [...]}, ...]}, ...]}

``joins`` scripts continuous batching: `ScriptedLink` offers each listed batch (ids 2, 3, ... in list order;
the scenario's own batch is id 1) when the output rank asks for the ``at``-th time (0 = after the prefill
step), exactly as the Agent's link would offer batches that arrived meanwhile. Joined batches write
``<scenario>/b<id>/<i>/...`` and failures ``<scenario>/b<id>/error``.

Importing torch + transformers costs several seconds per process on 2 cores, so one set of processes
runs the layouts one after another: for each layout the ranks ``< world`` do what the Agent runtime
does (a fresh gloo default process group over ``tcp://127.0.0.1:port``, one ``dist.new_group`` per
stage in stage order on every rank, the shared-memory `HostComm`s, a `ShardContext`), build
``Qwen25VLShard``, run every scenario in order (stage-0 ranks get the instances, the others ``None``) and
destroy the group again; ranks
``>= world`` sit that layout out. Per layout the output rank writes OUT_DIR/<layout>/result.npz
(``<scenario>/<i>/tokens``, ``.../logits``, ``.../reason``, ``<scenario>/error``) and every rank writes
OUT_DIR/<layout>/rank<r>.json (what it holds, what each call returned, timings).
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


class ScriptedLink:
    """A `BatchLink` that offers scripted batches at given steps (the same script on every rank)."""

    def __init__(self, joins: list[dict], make_instances, stage0: bool, cancels: list[dict]) -> None:
        from servable_framework.agent.shard import WaitingBatch

        self.cancels = cancels  # [{"at": step, "batch": id, "index": i}]: the caller of that instance gave up
        self.stops: list[list[int]] = []
        self.batch_id = 1
        self.asked = 0
        self.waiting = [(j["at"], WaitingBatch(2 + n, make_instances(j["instances"]) if stage0 else None,
                                               len(j["instances"]))) for n, j in enumerate(joins)]
        self.completed: dict[int, object] = {}
        self.failed: dict[int, str] = {}

    def emit(self, batch_id, index, outputs) -> None:
        pass

    def complete(self, batch_id, outputs) -> None:
        self.completed[batch_id] = outputs

    def fail(self, batch_id, error) -> None:
        self.failed[batch_id] = f"{type(error).__name__}: {error}"

    def joinable(self, active_rows: int) -> int:
        k = sum(1 for at, _ in self.waiting if at == self.asked)
        self.asked += 1
        return k

    def join(self, k: int):
        taken, self.waiting = self.waiting[:k], self.waiting[k:]
        return [w for _, w in taken]

    def cancelled(self) -> set[tuple[int, int]]:  # called before the step, `joinable` after it
        return {(c["batch"], c["index"]) for c in self.cancels if c["at"] <= self.asked}

    def stopped(self, batch_id: int, index: int) -> None:
        self.stops.append([batch_id, index])

    def stream(self, pieces) -> None:
        pass

    def progress(self) -> None:
        pass


def run_layout(rank: int, layout: dict, plan: dict, out_dir: Path) -> None:
    from agents.qwen2_5_vl import Qwen25VLShard
    from servable_framework.agent.shard import ShardContext
    from servable_framework.engine.collectives import HostComm, host_comm_supported

    t0 = time.perf_counter()
    world, stage_size = layout["world"], layout["stage_size"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{layout['port']}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    tp = world // stage_size
    tp_group = None
    for stage in range(stage_size):  # every rank creates every stage's group, in order
        group = dist.new_group(list(range(stage * tp, (stage + 1) * tp))) if tp > 1 else None
        if stage == rank // tp:
            tp_group = group
    comm = host = None  # as the Agent runtime: collectives of ranks on one host go through shared memory
    if world > 1 and host_comm_supported(torch.device("cpu")):
        store = dist.distributed_c10d._get_default_store()
        if tp > 1:
            comm = HostComm.connect(store, f"tp{rank // tp}", tp_group, tp, rank % tp, 60.0)
        host = HostComm.connect(store, "world", None, world, rank, 60.0)

    def make_shard(eos):
        options = {} if eos is None else {"eos_token_id": eos}
        ctx = ShardContext(rank=rank, rank_size=world, stage_size=stage_size, model_files=[layout["ckpt"]],
                           device=torch.device("cpu"), tp_group=tp_group, options=options, comm=comm,
                           host_comm=host)
        return ctx, Qwen25VLShard(ctx)

    inputs = np.load(plan["inputs"])
    shards: dict[str, tuple] = {}
    results: dict[str, np.ndarray] = {}
    report: dict = {"rank": rank, "returned": {}}
    for scenario in plan["scenarios"]:
        key = json.dumps(scenario.get("eos"))
        if key not in shards:
            shards[key] = make_shard(scenario.get("eos"))
        ctx, shard = shards[key]
        name = scenario["name"]

        def make_instances(spec: list[dict]) -> list:
            return [[inputs[f"{inst['prompt']}/input_ids"], inputs[f"{inst['prompt']}/pixel_values"],
                     inputs[f"{inst['prompt']}/image_grid_thw"], np.asarray(inst["sampling"], dtype=np.float64)]
                    for inst in spec]

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
                    for key, joined in shard.last_results.items() if res is not None else ():
                        for i, tokens in enumerate(joined.tokens):
                            results[f"{name}/b{key}/{i}/tokens"] = np.asarray(tokens, dtype=np.int64)
                            results[f"{name}/b{key}/{i}/logits"] = joined.logits[i]
                    for key, text in link.failed.items():
                        if ctx.is_output_rank:
                            results[f"{name}/b{key}/error"] = np.array(text)
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
        has_visual=model.visual is not None, has_lm_head=model.lm_head is not None, vocab_size=model.vocab_size,
        head_shape=list(model.lm_head.weight.shape) if model.lm_head is not None else None,
        shapes={n: list(t.shape) for n, t in held.items() if n.startswith("text.layers.0.")},
        seconds=round(time.perf_counter() - t0, 2),
    )
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
    import agents.qwen2_5_vl  # noqa: F401  (the expensive imports, timed once)

    timings = {"imports_s": round(time.perf_counter() - T_START, 2)}
    for layout in plan["layouts"]:
        if rank < layout["world"]:
            run_layout(rank, layout, plan, Path(args.out))
    timings["total_s"] = round(time.perf_counter() - T_START, 2)
    (Path(args.out) / f"timings{rank}.json").write_text(json.dumps(timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
