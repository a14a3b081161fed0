"""Numerics of the Qwen2.5 text-only model file (``agents/qwen2.py``) against the unsharded Hugging Face model.

The second model family on the generation engine: a tiny random ``Qwen2ForCausalLM`` (tied embeddings, 3 layers)
is built offline (seeded) into a temp dir. The reference is ``Qwen2ForCausalLM.from_pretrained`` (unsharded,
greedy ``generate`` with ``output_logits``). The parallel layouts (TP 2, TP 4, and PP 2 x TP 2 on a resharded
checkpoint with an explicit, untied ``lm_head.weight`` equal to the embedding, split over 3 files) run in real
OS processes, one per rank (`qwen_text_harness.py`; one set of processes runs the layouts one after another),
and we compare per-step logits (< 1e-5) and the tokens: alone and batched (left padding, per-instance
max_new_tokens), a seeded sampled instance (replayed from its recorded logits, and its logits along the sampled
path vs the HF model teacher-forced), EOS stopping, a rejected instance that must leave all ranks in step,
batches joining a running decode loop, and the predict() format.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from servable_framework.engine.layers import split_layers
from tests.support.harness_runs import load_runs
from tests.support.procs import REPO, child_env, free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HARNESS = Path(__file__).with_name("qwen_text_harness.py")
ATOL = 1e-5
MAX_NEW = 10
LAUNCH_TIMEOUT_S = 240
LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 3, 128, 8, 4, 16, 256

PROMPTS = {  # name: chat messages (the token ids come from the checkpoint's own chat template)
    "hello": [{"role": "user", "content": "Hello, world! Tell me about tensor parallel inference."}],
    "hi": [{"role": "user", "content": "Hi"}],
    "fox": [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "The quick brown fox jumps over the lazy dog. Why?"},
            {"role": "assistant", "content": "It is a pangram."},
            {"role": "user", "content": "And then?"}],
}


def greedy(n: int) -> list[float]:
    return [n, 0.0, 1.0, 0, -1]


SAMPLED = [8, 0.9, 0.9, 40, 7]  # max_new_tokens, temperature, top_p, top_k, seed


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from servables.qwen_text.tiny_model import build_tiny_qwen_text

    out = tmp_path_factory.mktemp("tiny")
    path = build_tiny_qwen_text(out)
    assert build_tiny_qwen_text(out) == path  # idempotent: the marker short-circuits a second build
    return path


@pytest.fixture(scope="module")
def ckpt_untied_sharded(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model with ``tie_word_embeddings`` off and an explicit ``lm_head.weight`` (a copy of the
    embedding, so the reference is unchanged), split over 3 files with model.safetensors.index.json."""
    from safetensors.torch import load_file, save_file

    dst = tmp_path_factory.mktemp("sharded") / "tiny-qwen25-text-sharded"
    dst.mkdir()
    for f in ckpt.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    (dst / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    tensors = load_file(ckpt / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    names = [f"model-0000{i + 1}-of-00003.safetensors" for i in range(3)]
    files: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    weight_map = {}
    for i, k in enumerate(sorted(tensors)):
        files[names[i % 3]][k] = tensors[k]
        weight_map[k] = names[i % 3]
    for name, part in files.items():
        save_file(part, dst / name, metadata={"format": "pt"})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return dst


@pytest.fixture(scope="module")
def prompts(ckpt: Path) -> dict[str, torch.Tensor]:
    """Token ids [1, T] of each prompt, from the stock tokenizer and its chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    out = {name: tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"] for name, messages in PROMPTS.items()}
    lengths = {k: v.shape[1] for k, v in out.items()}
    assert len(set(lengths.values())) == 3, lengths  # batching really pads
    return out


@pytest.fixture(scope="module")
def hf_model(ckpt: Path) -> Any:
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference(hf_model: Any, prompts: dict[str, torch.Tensor]) -> Any:
    """reference(prompt, max_new, eos=None) -> (tokens without EOS, logits [steps, V]) from HF generate."""

    @cache
    def run(prompt: str, max_new: int, eos: tuple[int, ...] | None = None) -> tuple[list[int], np.ndarray]:
        eos_ids = list(eos) if eos else hf_model.generation_config.eos_token_id
        ids = prompts[prompt]
        with torch.inference_mode():
            out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                    do_sample=False, eos_token_id=eos_ids, output_logits=True,
                                    return_dict_in_generate=True)
        new = out.sequences[0, ids.shape[1]:].tolist()
        if new and new[-1] in eos_ids:
            new = new[:-1]
        return new, torch.cat(out.logits).float().numpy()

    return run


@pytest.fixture(scope="module")
def teacher_forced(hf_model: Any, prompts: dict[str, torch.Tensor]) -> Any:
    """Logits of the HF model along a given continuation (one full forward; for the sampled path)."""

    def run(prompt: str, tokens: list[int], steps: int) -> np.ndarray:
        ids = prompts[prompt]
        t = ids.shape[1]
        full = torch.cat([ids, torch.tensor([tokens[:steps - 1]], dtype=torch.long)], dim=1)
        with torch.inference_mode():
            logits = hf_model(input_ids=full, attention_mask=torch.ones_like(full)).logits[0, t - 1:t - 1 + steps]
        return logits.float().numpy()

    return run


# --------------------------------------------------------------------------- launching ranks


def launch(plan: dict[str, Any], work: Path, n_procs: int) -> dict[str, tuple[dict[str, np.ndarray], list[dict]]]:
    """Start one harness process per rank, wait with a deadline, kill leftovers.

    Returns {layout: (output-rank arrays, per-rank reports)}."""
    plan_file = work / "plan.json"
    plan_file.write_text(json.dumps(plan))
    env = child_env(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    procs: list[subprocess.Popen[bytes]] = []
    with ExitStack() as logs:
        try:
            for rank in range(n_procs):
                log = logs.enter_context(open(work / f"rank{rank}.log", "wb"))
                procs.append(subprocess.Popen(
                    [sys.executable, str(HARNESS), "--plan", str(plan_file), "--out", str(work)],
                    env=dict(env, RANK=str(rank)), stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
            deadline = time.monotonic() + LAUNCH_TIMEOUT_S
            for proc in procs:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"ranks did not finish within {LAUNCH_TIMEOUT_S}s:\n{_tails(work, n_procs)}")
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)
    codes = [p.returncode for p in procs]
    assert codes == [0] * n_procs, f"exit codes {codes}:\n{_tails(work, n_procs)}"
    return load_runs(work, plan)


def _tails(work: Path, world: int) -> str:
    parts = []
    for r in range(world):
        f = work / f"rank{r}.log"
        text = f.read_text(errors="replace") if f.exists() else "(no log)"
        parts.append(f"--- rank {r} ---\n{text[-3000:]}")
    return "\n".join(parts)


# --------------------------------------------------------------------------- unit-level checks


def test_unsupported_layouts_and_configs_are_clear_errors(ckpt: Path, tmp_path: Path) -> None:
    from agents.qwen2 import Qwen2Shard
    from servable_framework.agent.shard import ShardContext

    def shard(path: Path, rank_size: int) -> Qwen2Shard:  # raises before any torch.distributed call or loading
        return Qwen2Shard(ShardContext(rank=0, rank_size=rank_size, stage_size=1, model_files=[str(path)],
                                       device=torch.device("cpu")))

    with pytest.raises(ValueError, match=r"num_key_value_heads 4 is not divisible by tensor-parallel size 8"):
        shard(ckpt, 8)
    with pytest.raises(ValueError, match=r"num_attention_heads 8 is not divisible by tensor-parallel size 3 .*"
                                         r"valid tensor-parallel sizes for this model: \[1, 2, 4\]"):
        shard(ckpt, 3)
    config = json.loads((ckpt / "config.json").read_text())
    config.pop("layer_types")
    (tmp_path / "config.json").write_text(json.dumps({**config, "use_sliding_window": True, "sliding_window": 64,
                                                      "max_window_layers": 0}))
    with pytest.raises(ValueError, match="sliding-window attention"):
        shard(tmp_path, 1)


def test_single_rank_matches_hf_and_rejects_bad_instances(ckpt: Path, prompts: dict[str, torch.Tensor],
                                                         reference: Any) -> None:
    """TP 1 in this process (no process group): the model file alone, batched, against the reference."""
    from agents.qwen2 import Qwen2Shard
    from servable_framework.agent.shard import ShardContext

    shard = Qwen2Shard(ShardContext(rank=0, rank_size=1, stage_size=1, model_files=[str(ckpt)],
                                    device=torch.device("cpu")))
    try:
        names = list(PROMPTS)
        res = shard.generate([[prompts[n][0].numpy(), np.asarray(greedy(6), np.float64)] for n in names],
                             collect_logits=True)
        assert res is not None
        for i, name in enumerate(names):
            ref_tokens, ref_logits = reference(name, 6)
            assert res.tokens[i] == ref_tokens
            assert float(np.abs(res.logits[i] - ref_logits).max()) < ATOL
        ids = prompts["hi"][0].numpy()
        for instance, fragment in [
            ([ids], "expected 2 inputs"),
            ([ids.astype(np.float32), np.asarray(greedy(2))], "input_ids must be a non-empty 1-D integer tensor"),
            ([ids[:0], np.asarray(greedy(2))], "input_ids must be a non-empty 1-D integer tensor"),
            ([np.array([0, 512]), np.asarray(greedy(2))], r"input_ids out of range \[0, 512\)"),
            ([ids, np.asarray([0, 0.0, 1.0, 0, -1])], "max_new_tokens must be a positive integer"),
            ([ids, "x"], "sampling must be a tensor"),
        ]:
            with pytest.raises(ValueError, match=f"instance 0: {fragment}"):
                shard.generate([instance])
    finally:
        shard.close()


# --------------------------------------------------------------------------- the parallel layouts

LAYOUTS = {
    # name: (world, stage_size, checkpoint fixture)
    "tp2": (2, 1, "ckpt"),
    "tp4": (4, 1, "ckpt"),
    "pp2_tp2": (4, 2, "ckpt_untied_sharded"),
}


def make_spec(work: Path, prompts: dict[str, torch.Tensor], eos_token: int) -> dict[str, Any]:
    arrays = {name: ids[0].numpy().astype(np.int64) for name, ids in prompts.items()}
    arrays["bad"] = np.concatenate([arrays["hi"], [100000]])  # a token id past the vocabulary
    np.savez(work / "inputs.npz", **arrays)  # type: ignore[arg-type]

    def inst(prompt: str, sampling: list[float]) -> dict[str, Any]:
        return {"prompt": prompt, "sampling": sampling}

    return {"inputs": str(work / "inputs.npz"), "scenarios": [
        {"name": "hello", "instances": [inst("hello", greedy(MAX_NEW))]},
        {"name": "hi", "instances": [inst("hi", greedy(MAX_NEW))]},
        {"name": "fox", "instances": [inst("fox", greedy(8))]},
        {"name": "batch", "instances": [inst("hello", greedy(MAX_NEW)), inst("hi", greedy(6)), inst("fox", greedy(8))]},
        {"name": "bad", "instances": [inst("hi", greedy(3)), inst("bad", greedy(3))]},
        {"name": "empty", "instances": []},
        {"name": "sample", "instances": [inst("hi", SAMPLED)]},
        {"name": "sample_batch", "instances": [inst("hello", greedy(4)), inst("hi", SAMPLED)]},
        {"name": "eos", "eos": [eos_token], "instances": [inst("hi", greedy(MAX_NEW))]},
        {"name": "eos_batch", "eos": [eos_token], "instances": [inst("hello", greedy(MAX_NEW)),
                                                                 inst("hi", greedy(MAX_NEW))]},
        {"name": "predict", "api": "predict", "instances": [inst("hi", greedy(5)), inst("hello", greedy(3))]},
        # continuous batching on the same engine: a bad batch fails alone, two join at once
        {"name": "join", "instances": [inst("hello", greedy(MAX_NEW))], "joins": [
            {"at": 1, "instances": [inst("bad", greedy(3))]},
            {"at": 2, "instances": [inst("hi", greedy(6))]},
            {"at": 4, "instances": [inst("fox", greedy(8)), inst("hi", greedy(3))]}]},
    ]}


@pytest.fixture(scope="module")
def eos_token(reference: Any) -> int:
    """A token greedy decoding of "hi" produces at step 3 (and not before): the EOS override in tests."""
    tokens, _ = reference("hi", MAX_NEW)
    assert tokens[3] not in tokens[:3]
    return int(tokens[3])


@pytest.fixture(scope="module")
def layout_runs(request: pytest.FixtureRequest, prompts: dict[str, torch.Tensor], eos_token: int,
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, np.ndarray], list[dict]]]:
    """All layouts, run by one set of real rank processes (one fresh process group per layout)."""
    work = tmp_path_factory.mktemp("ranks")
    plan = make_spec(work, prompts, eos_token)
    plan["layouts"] = [
        {"name": name, "world": world, "stage_size": stages, "ckpt": str(request.getfixturevalue(fixture)),
         "port": free_port()}
        for name, (world, stages, fixture) in LAYOUTS.items()
    ]
    n_procs = max(world for world, _, _ in LAYOUTS.values())
    t0 = time.perf_counter()
    runs = launch(plan, work, n_procs)
    timings = [json.loads((work / f"timings{r}.json").read_text()) for r in range(n_procs)]
    print(f"\nrank processes: {time.perf_counter() - t0:.1f}s wall; per rank {timings}; per layout "
          + ", ".join(f"{k} {max(r['seconds'] for r in v[1])}s" for k, v in runs.items()))
    return runs


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharded_matches_unsharded_hf(layout: str, layout_runs: Any, reference: Any, teacher_forced: Any,
                                      eos_token: int) -> None:
    world, stage_size, _ = LAYOUTS[layout]
    res, reports = layout_runs[layout]
    hi_tokens, _ = reference("hi", MAX_NEW)
    worst: dict[str, float] = {}

    def record(kind: str, diff: float) -> None:
        worst[kind] = max(worst.get(kind, 0.0), diff)

    def check(scenario: str, i: int, prompt: str, max_new: int, eos: tuple[int, ...] | None = None,
              kind: str = "batched_vs_hf") -> np.ndarray:
        ref_tokens, ref_logits = reference(prompt, max_new, eos)
        tokens, logits = res[f"{scenario}/{i}/tokens"].tolist(), res[f"{scenario}/{i}/logits"]
        assert tokens == ref_tokens, f"{layout} {scenario}[{i}]: tokens {tokens} != reference {ref_tokens}"
        assert logits.shape == ref_logits.shape, (scenario, i, logits.shape, ref_logits.shape)
        diff = float(np.abs(logits - ref_logits).max())
        record(kind, diff)
        assert diff < ATOL, f"{layout} {scenario}[{i}]: max |logit diff| {diff:.3g} vs unsharded HF"
        return logits

    # alone vs the unsharded model
    alone = {p: check(p, 0, p, n, kind="alone_vs_hf") for p, n in (("hello", MAX_NEW), ("hi", MAX_NEW), ("fox", 8))}
    assert [str(res[f"{p}/0/reason"]) for p in alone] == ["length"] * 3

    # batched (left padding, per-instance max_new_tokens) vs the reference and vs each alone
    for i, (p, n) in enumerate((("hello", MAX_NEW), ("hi", 6), ("fox", 8))):
        logits = check("batch", i, p, n)
        assert res[f"batch/{i}/tokens"].tolist() == res[f"{p}/0/tokens"].tolist()[:n]
        diff = float(np.abs(logits - alone[p][:n]).max())
        record("batched_vs_alone", diff)
        assert diff < ATOL, f"{layout} batch[{i}] vs alone: {diff:.3g}"

    # a rejected request: every rank raised the same ValueError and stayed in step for what follows
    assert "instance 1: input_ids out of range [0, 512)" in str(res["bad/error"])
    for rep in reports:
        assert rep["returned"]["bad"].startswith("ValueError: instance 1:"), rep

    # an empty batch: an empty result on the output rank, None elsewhere, nothing left in flight
    for rep in reports:
        is_output = rep["stage"] == stage_size - 1 and rep["tp_rank"] == 0
        assert rep["returned"]["empty"] == ("GenerationResult" if is_output else None)

    # sampling: seeded, so batch == alone; the replayed sampler reproduces the tokens from the recorded logits;
    # the logits along the sampled path match the HF model teacher-forced
    from servable_framework.engine.sampling import SamplingParams, sample_row

    sampled = res["sample/0/tokens"].tolist()
    assert sampled == res["sample_batch/1/tokens"].tolist()
    assert len(sampled) == SAMPLED[0] and sampled != hi_tokens[:SAMPLED[0]]
    gen = torch.Generator().manual_seed(int(SAMPLED[4]))
    params = SamplingParams.from_vector(np.asarray(SAMPLED, dtype=np.float64))
    replay = [sample_row(torch.from_numpy(row), params, gen) for row in res["sample/0/logits"]]
    assert replay == sampled
    for key in ("sample/0/logits", "sample_batch/1/logits"):
        diff = float(np.abs(res[key] - teacher_forced("hi", sampled, len(sampled))).max())
        record("sampled_vs_hf_teacher_forced", diff)
        assert diff < ATOL, f"{layout} {key} vs teacher-forced HF: {diff:.3g}"
    check("sample_batch", 0, "hello", 4)

    # EOS stop (token excluded, its step's logits included), alone and in a batch
    check("eos", 0, "hi", MAX_NEW, (eos_token,), kind="alone_vs_hf")
    assert str(res["eos/0/reason"]) == "eos" and len(res["eos/0/tokens"]) == 3
    check("eos_batch", 0, "hello", MAX_NEW, (eos_token,))
    check("eos_batch", 1, "hi", MAX_NEW, (eos_token,))
    assert str(res["eos_batch/1/reason"]) == "eos"

    # predict(): one int64 [n] value per instance on the output rank, None elsewhere
    for rep in reports:
        is_output = rep["stage"] == stage_size - 1 and rep["tp_rank"] == 0
        assert rep["returned"]["predict"] == ([[["int64", [5]]], [["int64", [3]]]] if is_output else None)
    assert res["predict/0/tokens"].tolist() == hi_tokens[:5]
    assert res["predict/1/tokens"].tolist() == reference("hello", MAX_NEW)[0][:3]

    # each rank holds only its part: its layers (3 over 2 stages: 2 + 1), 1/tp of each projection, the embedding
    # on stage 0 only, 1/tp of the vocabulary-parallel head (tied or not) on every rank of the last stage
    tp = world // stage_size
    bounds = split_layers(LAYERS, stage_size)
    for rep in reports:
        first, last = rep["stage"] == 0, rep["stage"] == stage_size - 1
        assert rep["layers"] == list(bounds[rep["stage"]])
        assert rep["has_embed"] == first and rep["has_lm_head"] == last
        assert sum(n.startswith("decoder.") and n.endswith("input_layernorm.weight") for n in rep["held"]) == \
            bounds[rep["stage"]][1] - bounds[rep["stage"]][0]
        if last:
            vocab, chunk = rep["vocab_size"], -(-rep["vocab_size"] // tp)
            assert rep["head_shape"] == [chunk if rep["tp_rank"] < tp - 1 else vocab - (tp - 1) * chunk, HIDDEN]
        shapes = rep["shapes"]
        assert shapes["decoder.0.self_attn.q_proj.weight"] == [HEADS * HEAD_DIM // tp, HIDDEN]
        assert shapes["decoder.0.self_attn.q_proj.bias"] == [HEADS * HEAD_DIM // tp]
        assert shapes["decoder.0.self_attn.k_proj.weight"] == [KV_HEADS * HEAD_DIM // tp, HIDDEN]
        assert shapes["decoder.0.self_attn.o_proj.weight"] == [HIDDEN, HEADS * HEAD_DIM // tp]
        assert shapes["decoder.0.mlp.gate_proj.weight"] == [INTERMEDIATE // tp, HIDDEN]
        assert shapes["decoder.0.mlp.down_proj.weight"] == [HIDDEN, INTERMEDIATE // tp]
    print(f"\n[{layout}] max |logit diff|: " + ", ".join(f"{k} {v:.3g}" for k, v in worst.items()))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_joined_batches_match_unsharded_hf(layout: str, layout_runs: Any, reference: Any) -> None:
    """Continuous batching on the same engine: batches that joined a running decode loop get the unsharded
    model's logits at every step, and so does the batch they joined; a bad one fails alone on every rank."""
    res, reports = layout_runs[layout]

    def check(key: str, prompt: str, max_new: int) -> None:
        ref_tokens, ref_logits = reference(prompt, max_new)
        tokens, logits = res[f"{key}/tokens"].tolist(), res[f"{key}/logits"]
        assert tokens == ref_tokens, f"{layout} {key}: tokens {tokens} != reference {ref_tokens}"
        assert logits.shape == ref_logits.shape, (key, logits.shape, ref_logits.shape)
        diff = float(np.abs(logits - ref_logits).max())
        assert diff < ATOL, f"{layout} {key}: max |logit diff| {diff:.3g} vs unsharded HF"

    check("join/0", "hello", MAX_NEW)
    check("join/b3/0", "hi", 6)
    check("join/b4/0", "fox", 8)
    check("join/b4/1", "hi", 3)
    assert "instance 0: input_ids out of range [0, 512)" in str(res["join/b2/error"])
    for rep in reports:  # every rank took in, completed and failed the same batches, and none is left
        assert rep["joined"]["join"]["completed"] == [1, 3, 4], rep
        assert sorted(rep["joined"]["join"]["failed"]) == ["2"] and rep["joined"]["join"]["left"] == 0, rep
