"""Numerics of the Qwen2.5-VL shard against the unsharded Hugging Face model.

A tiny random Qwen2.5-VL is built offline (seeded) into a temp dir. The reference is
``Qwen2_5_VLForConditionalGeneration.from_pretrained`` (unsharded, greedy ``generate`` with
``output_logits``). The parallel layouts (TP 2, TP 4, PP 2 x TP 2 on a resharded checkpoint with the
transformers-5 key names) run in real OS processes, one per rank (`qwen_shard_harness.py`; one set
of processes runs the layouts one after another, each with a fresh gloo process group, since
importing torch + transformers dominates the run time), and we compare per-step logits (< 1e-5) and
the tokens, alone and batched (left padding, per-instance max_new_tokens, a sampled instance),
plus EOS stopping, a rejected request that must leave all ranks in step, and the predict() format.
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

import numpy as np
import pytest
import torch

from tests.support.harness_runs import load_runs
from tests.support.procs import REPO, child_env, free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HARNESS = Path(__file__).with_name("qwen_shard_harness.py")
ATOL = 1e-5
MAX_NEW = 10
LAUNCH_TIMEOUT_S = 120


def greedy(n: int) -> list[float]:
    return [n, 0.0, 1.0, 0, -1]


SAMPLED = [8, 0.9, 0.9, 40, 7]  # max_new_tokens, temperature, top_p, top_k, seed


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from servables.qwen.tiny_model import build_tiny_qwen

    out = tmp_path_factory.mktemp("tiny")
    path = build_tiny_qwen(out)
    assert build_tiny_qwen(out) == path  # idempotent: the marker short-circuits a second build
    return path


@pytest.fixture(scope="module")
def ckpt_sharded_new_layout(ckpt, tmp_path_factory) -> Path:
    """The same weights with transformers-5 key names (model.language_model.*, model.visual.*),
    split over 3 files with model.safetensors.index.json."""
    from safetensors.torch import load_file, save_file

    dst = tmp_path_factory.mktemp("sharded") / "tiny-qwen25vl-sharded"
    dst.mkdir()
    for f in ckpt.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    tensors = load_file(ckpt / "model.safetensors")

    def new_name(k: str) -> str:
        if k.startswith("visual."):
            return "model." + k
        if k.startswith("model.") and not k.startswith(("model.language_model.", "model.visual.")):
            return "model.language_model." + k[len("model."):]
        return k

    renamed = {new_name(k): v for k, v in tensors.items()}
    assert any(k.startswith("model.language_model.layers.") for k in renamed)
    files: dict[str, dict] = {f"model-0000{i + 1}-of-00003.safetensors": {} for i in range(3)}
    names = list(files)
    weight_map = {}
    for i, k in enumerate(sorted(renamed)):
        files[names[i % 3]][k] = renamed[k]
        weight_map[k] = names[i % 3]
    for name, part in files.items():
        save_file(part, dst / name, metadata={"format": "pt"})
    total = sum(v.numel() * v.element_size() for v in renamed.values())
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return dst


@pytest.fixture(scope="module")
def prompts(ckpt, tmp_path_factory) -> dict[str, dict]:
    """Processor outputs (torch tensors) for an image prompt (PNG file), a second image of another
    size (PIL object) and a text-only prompt, via the chat template + process_vision_info."""
    from PIL import Image, ImageDraw

    from servables.qwen.vision_compat import load_processor, process_vision_info

    processor = load_processor(ckpt)
    png = tmp_path_factory.mktemp("img") / "shapes.png"
    img = Image.new("RGB", (96, 64), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([10, 10, 50, 40], fill="red")
    draw.ellipse([55, 20, 90, 55], fill="blue")
    img.save(png)
    img2 = Image.new("RGB", (60, 120), "yellow")
    ImageDraw.Draw(img2).line([0, 0, 60, 120], fill="black", width=5)

    def encode(content) -> dict:
        messages = [{"role": "user", "content": content}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images, videos = process_vision_info(messages)
        return dict(processor(text=[text], images=images, videos=videos, return_tensors="pt"))

    from transformers.utils import is_torchvision_available

    out = {
        "img": encode([{"type": "image", "image": f"file://{png}"}, {"type": "text", "text": "Describe this image."}]),
        "img2": encode([{"type": "image", "image": img2}, {"type": "text", "text": "What is in the picture?"}]),
        "txt": encode("Hello, world! Tell me about tensor parallel inference."),
    }
    assert out["img"]["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert out["img2"]["image_grid_thw"].tolist() != out["img"]["image_grid_thw"].tolist()
    assert "pixel_values" not in out["txt"]
    if not is_torchvision_available():  # the import stub for qwen_vl_utils must not linger
        assert "torchvision" not in sys.modules
    lengths = {k: v["input_ids"].shape[1] for k, v in out.items()}
    assert len(set(lengths.values())) == 3, lengths  # batching really pads
    return out


def shard_inputs(enc: dict) -> dict[str, np.ndarray]:
    """The shard's first three inputs from processor outputs (sampling is added per scenario)."""
    return {
        "input_ids": enc["input_ids"][0].numpy().astype(np.int64),
        "pixel_values": enc["pixel_values"].numpy().astype(np.float32) if "pixel_values" in enc
        else np.zeros((0, 1176), np.float32),
        "image_grid_thw": enc["image_grid_thw"].numpy().astype(np.int64) if "image_grid_thw" in enc
        else np.zeros((0, 3), np.int64),
    }


@pytest.fixture(scope="module")
def hf_model(ckpt):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference(hf_model, prompts):
    """reference(prompt, max_new, eos=None) -> (tokens without EOS, logits [steps, V]) from HF generate."""

    @cache
    def run(prompt: str, max_new: int, eos: tuple[int, ...] | None = None):
        eos_ids = list(eos) if eos else hf_model.generation_config.eos_token_id
        with torch.inference_mode():
            out = hf_model.generate(**prompts[prompt], max_new_tokens=max_new, do_sample=False, eos_token_id=eos_ids,
                                    output_logits=True, return_dict_in_generate=True)
        new = out.sequences[0, prompts[prompt]["input_ids"].shape[1]:].tolist()
        if new and new[-1] in eos_ids:
            new = new[:-1]
        return new, torch.cat(out.logits).float().numpy()

    return run


@pytest.fixture(scope="module")
def teacher_forced(hf_model, prompts):
    """Logits of the HF model along a given continuation (one full forward; for the sampled path)."""

    def run(prompt: str, tokens: list[int], steps: int) -> np.ndarray:
        enc = dict(prompts[prompt])
        T = enc["input_ids"].shape[1]
        extra = torch.tensor([tokens[:steps - 1]], dtype=torch.long)
        enc["input_ids"] = torch.cat([enc["input_ids"], extra], dim=1)
        enc["attention_mask"] = torch.ones_like(enc["input_ids"])
        enc["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(extra)], dim=1)
        with torch.inference_mode():
            logits = hf_model(**enc).logits[0, T - 1:T - 1 + steps]
        return logits.float().numpy()

    return run


# --------------------------------------------------------------------------- launching ranks


def launch(plan: dict, work: Path, n_procs: int) -> dict[str, tuple[dict, list[dict]]]:
    """Start one harness process per rank, wait with a deadline, kill leftovers.

    Returns {layout: (output-rank arrays, per-rank reports)}."""
    plan_file = work / "plan.json"
    plan_file.write_text(json.dumps(plan))
    env = child_env(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    procs: list[subprocess.Popen] = []
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


def test_tp_not_dividing_heads_is_a_clear_error(ckpt):
    from agents.qwen2_5_vl import Qwen25VLShard
    from servable_framework.agent.shard import ShardContext

    def shard(rank_size: int):  # raises before any torch.distributed call or weight loading
        return Qwen25VLShard(ShardContext(rank=0, rank_size=rank_size, stage_size=1, model_files=[str(ckpt)],
                                          device=torch.device("cpu")))

    with pytest.raises(ValueError, match=r"num_key_value_heads 4 is not divisible by tensor-parallel size 8"):
        shard(8)
    with pytest.raises(ValueError, match=r"num_attention_heads 8 is not divisible by tensor-parallel size 3 .*"
                                         r"valid tensor-parallel sizes for this model: \[1, 2, 4\]"):
        shard(3)


def test_tp_error_for_7b_sizes():
    from types import SimpleNamespace

    from agents.qwen_parallel import check_tp_divisible

    cfg_7b = SimpleNamespace(num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944)
    check_tp_divisible(cfg_7b, 4)
    with pytest.raises(ValueError, match=r"num_attention_heads 28 is not divisible by tensor-parallel size 8 "
                                         r".*\[1, 2, 4\]"):
        check_tp_divisible(cfg_7b, 8)


def test_sampler_filters():
    from servable_framework.engine.sampling import Sampler, SamplingParams, sample_row

    def draw(temperature, top_p, top_k, gen):
        return sample_row(logits, SamplingParams(1, temperature, top_p, top_k), gen)

    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 2.0])
    assert draw(0.0, 1.0, 0, None) == 1  # greedy
    g = torch.Generator().manual_seed(0)
    assert {draw(1.0, 1.0, 1, g) for _ in range(20)} == {1}  # top_k=1 is greedy
    assert {draw(1.0, 1e-6, 0, g) for _ in range(20)} == {1}  # tiny top_p keeps the best
    assert {draw(1.0, 1.0, 2, g) for _ in range(200)} == {1, 2}  # top_k=2
    # top_p=0.9 over softmax([0, 3, 2.9, -1, 2]) ~ [.02, .46, .42, .01, .09]: keeps {1, 2, 4}
    assert {draw(1.0, 0.9, 0, g) for _ in range(300)} == {1, 2, 4}
    draws = [draw(0.7, 1.0, 0, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same draw
    assert len({draw(0.7, 1.0, 0, torch.Generator().manual_seed(s)) for s in range(40)}) > 1  # seeds matter
    # batched: rows with different options in one call; a seeded row draws alike alone and in a batch
    sampler = Sampler(torch.device("cpu"))
    sampler.add([SamplingParams(1), SamplingParams(1, 1.0, 1.0, 1), SamplingParams(1, 0.7, 0.9, 3, seed=11)])
    batch = torch.stack([logits, logits.flip(0), logits])
    for _ in range(20):
        tokens = sampler.sample(batch).tolist()
        assert tokens[0] == 1 and tokens[1] == 3 and tokens[2] in {1, 2, 4}
    replay = torch.Generator().manual_seed(11)
    fresh = Sampler(torch.device("cpu"))
    fresh.add([SamplingParams(1), SamplingParams(1, 0.7, 0.9, 3, seed=11)])
    alone = [sample_row(logits, SamplingParams(1, 0.7, 0.9, 3, seed=11), replay) for _ in range(30)]
    assert [fresh.sample(torch.stack([logits.flip(0), logits])).tolist()[1] for _ in range(30)] == alone


# --------------------------------------------------------------------------- the parallel layouts

LAYOUTS = {
    # name: (world, stage_size, checkpoint fixture)
    "tp2": (2, 1, "ckpt"),
    "tp4": (4, 1, "ckpt"),
    "pp2_tp2": (4, 2, "ckpt_sharded_new_layout"),
}


def make_spec(work: Path, prompts: dict, eos_token: int) -> dict:
    arrays = {}
    for name, enc in prompts.items():
        for k, v in shard_inputs(enc).items():
            arrays[f"{name}/{k}"] = v
    bad = shard_inputs(prompts["img"])
    arrays.update({f"bad/{k}": v for k, v in bad.items()})
    arrays["bad/pixel_values"] = bad["pixel_values"][:-4]  # grid says 24 patches, 20 given
    np.savez(work / "inputs.npz", **arrays)

    def inst(prompt, sampling):
        return {"prompt": prompt, "sampling": sampling}

    return {"inputs": str(work / "inputs.npz"), "scenarios": [
        {"name": "img", "instances": [inst("img", greedy(MAX_NEW))]},
        {"name": "txt", "instances": [inst("txt", greedy(MAX_NEW))]},
        {"name": "img2", "instances": [inst("img2", greedy(8))]},
        {"name": "batch", "instances": [inst("img", greedy(MAX_NEW)), inst("txt", greedy(6)), inst("img2", greedy(8))]},
        {"name": "bad", "instances": [inst("txt", greedy(3)), inst("bad", greedy(3))]},
        {"name": "empty", "instances": []},
        {"name": "sample", "instances": [inst("txt", SAMPLED)]},
        {"name": "sample_batch", "instances": [inst("img", greedy(4)), inst("txt", SAMPLED)]},
        {"name": "eos", "eos": [eos_token], "instances": [inst("txt", greedy(MAX_NEW))]},
        {"name": "eos_batch", "eos": [eos_token], "instances": [inst("img", greedy(MAX_NEW)),
                                                                 inst("txt", greedy(MAX_NEW))]},
        {"name": "predict", "api": "predict", "instances": [inst("txt", greedy(5)), inst("img", greedy(3))]},
        # continuous batching: batches join the running one at step boundaries (ids 2.. in list order); a bad
        # one fails alone; two join at once; the running batch ends before those that joined it
        {"name": "join", "instances": [inst("img", greedy(MAX_NEW))], "joins": [
            {"at": 1, "instances": [inst("bad", greedy(3))]},
            {"at": 2, "instances": [inst("txt", greedy(6))]},
            {"at": 4, "instances": [inst("img2", greedy(8)), inst("txt", greedy(3))]},
            {"at": 4, "instances": [inst("txt", greedy(3)), inst("bad", greedy(3))]},
            {"at": 4, "instances": [inst("img", greedy(2))]}]},
        # a batch offered at the step the running one finishes carries the loop on alone
        {"name": "join_after_done", "instances": [inst("txt", greedy(2))], "joins": [
            {"at": 1, "instances": [inst("img", greedy(4))]}]},
        # timed-out requests: the output rank stops their rows mid-batch, the others go on unharmed
        {"name": "cancel", "instances": [inst("img", greedy(MAX_NEW)), inst("txt", greedy(MAX_NEW))],
         "joins": [{"at": 1, "instances": [inst("img2", greedy(8))]}],
         "cancels": [{"at": 3, "batch": 1, "index": 0}, {"at": 5, "batch": 2, "index": 0}]},
    ]}


@pytest.fixture(scope="module")
def eos_token(reference) -> int:
    """A token greedy decoding of "txt" produces at step 3 (and not before): the EOS override in tests."""
    txt_tokens, _ = reference("txt", MAX_NEW)
    assert txt_tokens[3] not in txt_tokens[:3]
    return txt_tokens[3]


@pytest.fixture(scope="module")
def layout_runs(request, prompts, eos_token, tmp_path_factory) -> dict[str, tuple[dict, list[dict]]]:
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
def test_sharded_matches_unsharded_hf(layout, layout_runs, reference, teacher_forced, eos_token):
    world, stage_size, _ = LAYOUTS[layout]
    res, reports = layout_runs[layout]
    txt_tokens, _ = reference("txt", MAX_NEW)

    worst: dict[str, float] = {}

    def record(kind: str, diff: float) -> None:
        worst[kind] = max(worst.get(kind, 0.0), diff)

    def check(scenario: str, i: int, prompt: str, max_new: int, eos=None, kind: str = "batched_vs_hf") -> np.ndarray:
        ref_tokens, ref_logits = reference(prompt, max_new, eos)
        tokens, logits = res[f"{scenario}/{i}/tokens"].tolist(), res[f"{scenario}/{i}/logits"]
        assert tokens == ref_tokens, f"{layout} {scenario}[{i}]: tokens {tokens} != reference {ref_tokens}"
        assert logits.shape == ref_logits.shape, (scenario, i, logits.shape, ref_logits.shape)
        diff = float(np.abs(logits - ref_logits).max())
        record(kind, diff)
        assert diff < ATOL, f"{layout} {scenario}[{i}]: max |logit diff| {diff:.3g} vs unsharded HF"
        return logits

    # alone vs the unsharded model: text + image, text only, another image size
    alone = {p: check(p, 0, p, n, kind="alone_vs_hf") for p, n in (("img", MAX_NEW), ("txt", MAX_NEW), ("img2", 8))}
    assert [str(res[f"{p}/0/reason"]) for p in alone] == ["length"] * 3

    # batched (left padding, per-instance max_new_tokens) vs the reference and vs each alone
    for i, (p, n) in enumerate((("img", MAX_NEW), ("txt", 6), ("img2", 8))):
        logits = check("batch", i, p, n)
        assert res[f"batch/{i}/tokens"].tolist() == res[f"{p}/0/tokens"].tolist()[:n]
        diff = float(np.abs(logits - alone[p][:n]).max())
        record("batched_vs_alone", diff)
        assert diff < ATOL, f"{layout} batch[{i}] vs alone: {diff:.3g}"

    # a rejected request: every rank raised the same ValueError and stayed in step for what follows
    assert "instance 1: image_grid_thw describes 24 patches but pixel_values has 20" in str(res["bad/error"])
    for rep in reports:
        assert rep["returned"]["bad"].startswith("ValueError: instance 1:"), rep

    # an empty batch: an empty result on the output rank, None elsewhere, nothing left in flight
    for rep in reports:
        is_output = rep["stage"] == stage_size - 1 and rep["tp_rank"] == 0
        assert rep["returned"]["empty"] == ("GenerationResult" if is_output else None)

    # sampling: seeded, so batch == alone; the replayed sampler reproduces the tokens from the
    # recorded logits; the logits along the sampled path match the HF model teacher-forced
    from servable_framework.engine.sampling import SamplingParams, sample_row

    sampled = res["sample/0/tokens"].tolist()
    assert sampled == res["sample_batch/1/tokens"].tolist()
    assert len(sampled) == SAMPLED[0] and sampled != txt_tokens[:SAMPLED[0]]
    gen = torch.Generator().manual_seed(int(SAMPLED[4]))
    params = SamplingParams.from_vector(np.asarray(SAMPLED, dtype=np.float64))
    replay = [sample_row(torch.from_numpy(row), params, gen) for row in res["sample/0/logits"]]
    assert replay == sampled
    for key in ("sample/0/logits", "sample_batch/1/logits"):
        diff = float(np.abs(res[key] - teacher_forced("txt", sampled, len(sampled))).max())
        record("sampled_vs_hf_teacher_forced", diff)
        assert diff < ATOL, f"{layout} {key} vs teacher-forced HF: {diff:.3g}"
    check("sample_batch", 0, "img", 4)

    # EOS stop (token excluded, its step's logits included), alone and in a batch
    check("eos", 0, "txt", MAX_NEW, (eos_token,), kind="alone_vs_hf")
    assert str(res["eos/0/reason"]) == "eos" and len(res["eos/0/tokens"]) == 3
    check("eos_batch", 0, "img", MAX_NEW, (eos_token,))
    check("eos_batch", 1, "txt", MAX_NEW, (eos_token,))

    # predict(): one int64 [n] value per instance on the output rank, None elsewhere
    for rep in reports:
        is_output = rep["stage"] == stage_size - 1 and rep["tp_rank"] == 0
        assert rep["returned"]["predict"] == ([[["int64", [5]]], [["int64", [3]]]] if is_output else None)
    assert res["predict/0/tokens"].tolist() == txt_tokens[:5]
    assert res["predict/1/tokens"].tolist() == reference("img", MAX_NEW)[0][:3]

    # each rank holds only its part: its layers, 1/tp of each projection, vision on stage 0, 1/tp of the
    # vocabulary-parallel head on every rank of the last stage
    tp = world // stage_size
    for rep in reports:
        first, last = rep["stage"] == 0, rep["stage"] == stage_size - 1
        assert rep["layers"] == [rep["stage"] * 4 // stage_size, (rep["stage"] + 1) * 4 // stage_size]
        assert rep["has_visual"] == first
        assert rep["has_lm_head"] == last
        if last:
            vocab, chunk = rep["vocab_size"], -(-rep["vocab_size"] // tp)
            rows = chunk if rep["tp_rank"] < tp - 1 else vocab - (tp - 1) * chunk
            assert rep["head_shape"] == [rows, 128]
        assert rep["shapes"]["text.layers.0.self_attn.q_proj.weight"] == [128 // tp, 128]
        assert rep["shapes"]["text.layers.0.self_attn.k_proj.weight"] == [64 // tp, 128]
        assert rep["shapes"]["text.layers.0.self_attn.o_proj.weight"] == [128, 128 // tp]
        assert rep["shapes"]["text.layers.0.mlp.down_proj.weight"] == [128, 256 // tp]
    print(f"\n[{layout}] max |logit diff|: " + ", ".join(f"{k} {v:.3g}" for k, v in worst.items()))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_joined_batches_match_unsharded_hf(layout, layout_runs, reference) -> None:
    """Continuous batching: every batch that joined a running decode loop (its cache appended, left-padded)
    gets the unsharded model's logits at every step, and so does the batch it joined."""
    res, reports = layout_runs[layout]

    def check(key: str, prompt: str, max_new: int) -> None:
        ref_tokens, ref_logits = reference(prompt, max_new)
        tokens, logits = res[f"{key}/tokens"].tolist(), res[f"{key}/logits"]
        assert tokens == ref_tokens, f"{layout} {key}: tokens {tokens} != reference {ref_tokens}"
        assert logits.shape == ref_logits.shape, (key, logits.shape, ref_logits.shape)
        diff = float(np.abs(logits - ref_logits).max())
        assert diff < ATOL, f"{layout} {key}: max |logit diff| {diff:.3g} vs unsharded HF"

    check("join/0", "img", MAX_NEW)
    check("join/b3/0", "txt", 6)
    check("join/b4/0", "img2", 8)
    check("join/b4/1", "txt", 3)
    check("join/b6/0", "img", 2)
    assert "instance 0: image_grid_thw describes 24 patches but pixel_values has 20" in str(res["join/b2/error"])
    # three batches joined at one step, prefilled together; the bad one in the middle failed alone
    assert "instance 1: image_grid_thw describes 24 patches but pixel_values has 20" in str(res["join/b5/error"])
    check("join_after_done/0", "txt", 2)
    check("join_after_done/b2/0", "img", 4)
    # cancelled rows stop where they were (a prefix of the reference, logits included); the rest is unharmed
    cancelled = {"cancel/0": ("img", MAX_NEW, 3), "cancel/b2/0": ("img2", 8, None)}
    for key, (prompt, max_new, expect_len) in cancelled.items():
        ref_tokens, ref_logits = reference(prompt, max_new)
        tokens, logits = res[f"{key}/tokens"].tolist(), res[f"{key}/logits"]
        assert 0 < len(tokens) < max_new and tokens == ref_tokens[:len(tokens)], (layout, key, tokens, ref_tokens)
        assert expect_len is None or len(tokens) == expect_len, (layout, key, tokens)
        assert float(np.abs(logits - ref_logits[:len(tokens)]).max()) < ATOL, (layout, key)
    assert str(res["cancel/0/reason"]) == "cancelled"
    check("cancel/1", "txt", MAX_NEW)
    for rep in reports:  # every rank took in, completed and failed the same batches, and none is left
        assert rep["joined"]["join"]["completed"] == [1, 3, 4, 6], rep
        assert sorted(rep["joined"]["join"]["failed"]) == ["2", "5"] and rep["joined"]["join"]["left"] == 0, rep
        assert rep["joined"]["join_after_done"]["completed"] == [1, 2], rep
        assert rep["joined"]["cancel"]["completed"] == [1, 2] and rep["joined"]["cancel"]["left"] == 0, rep
    # only the output rank decides to stop a row (the finished flags it broadcasts drop it everywhere)
    stops = sorted((rep["joined"]["cancel"]["stopped"] for rep in reports), key=len)
    assert stops == [[]] * (len(reports) - 1) + [[[1, 0], [2, 0]]], stops
