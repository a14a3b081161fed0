"""Incremental postprocess of streaming methods: the delta rules (`worker.streaming`) and `MethodRunner` following
a streaming backend's pieces (no processes: a fake backend that streams like the engine)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from servable_framework.errors import InvalidInput
from servable_framework.servable.loader import load_servable
from servable_framework.worker.batcher import ModelBatcher, PieceSink
from servable_framework.worker.pipeline import MethodRunner
from servable_framework.worker.streaming import NotPrefixStable, OutputDiff, Piece, accumulate

SERVABLES = Path(__file__).resolve().parents[1] / "support" / "servables"
TEXTS = ["plain ascii", "héllo wörld", "€ and 😀 mixed: 中文", "😀😀", "a\xffb", ""]


def byte_decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def stream_bytes(text: str | bytes, chunks: tuple[int, ...] = (1, 2, 0)) -> tuple[list[str], str]:
    """Run `OutputDiff` over the byte-level decode of growing prefixes; returns (pieces, final text)."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    diff, pieces, made, step = OutputDiff(), [], 0, 0
    while made < len(data):
        made = min(len(data), made + chunks[step % len(chunks)])
        step += 1
        delta = diff.delta({"text": byte_decode(data[:made])}, final=False)
        if delta is not None:
            pieces.append(delta["text"])
    last = diff.delta({"text": byte_decode(data)}, final=True)
    assert last is not None
    pieces.append(last["text"])
    return pieces, byte_decode(data)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunks", [(1,), (1, 2, 0), (3,), (2, 5)])
def test_pieces_add_up_and_never_hold_a_broken_character(text: str, chunks: tuple[int, ...]) -> None:
    pieces, final = stream_bytes(text, chunks)
    assert "".join(pieces) == final
    if "\ufffd" not in final:
        assert all("\ufffd" not in p for p in pieces[:-1])


def test_split_character_is_held_back_until_complete() -> None:
    diff = OutputDiff()
    data = "a€".encode()  # 61 e2 82 ac
    assert diff.delta({"text": byte_decode(data[:1])}, final=False) == {"text": "a"}
    assert diff.delta({"text": byte_decode(data[:2])}, final=False) is None  # "a\ufffd": held
    assert diff.delta({"text": byte_decode(data[:3])}, final=False) is None
    assert diff.delta({"text": byte_decode(data)}, final=False) == {"text": "€"}
    assert diff.delta({"text": byte_decode(data)}, final=True) == {"text": ""}


def test_invalid_bytes_are_sent_once_more_text_follows_or_at_the_end() -> None:
    pieces, final = stream_bytes(b"a\xff", (1,))
    assert pieces == ["a", "\ufffd"] and final == "a\ufffd"  # held while last, sent by the final piece
    pieces, final = stream_bytes(b"a\xffbc", (1,))
    assert "".join(pieces) == final == "a\ufffdbc"
    assert pieces[:3] == ["a", "\ufffdb", "c"]


def test_arrays_send_new_rows_and_scalars_only_at_the_end() -> None:
    diff = OutputDiff()
    scalar = np.array(3.0)
    first = diff.delta({"ids": np.array([1, 2]), "score": scalar}, final=False)
    assert first is not None and set(first) == {"ids"} and first["ids"].tolist() == [1, 2]
    second = diff.delta({"ids": np.array([1, 2, 3]), "score": scalar}, final=False)
    assert second is not None and second["ids"].tolist() == [3]
    last = diff.delta({"ids": np.array([1, 2, 3, 4]), "score": scalar}, final=True)
    assert last is not None and last["ids"].tolist() == [4] and last["score"] is scalar


def test_array_deltas_join_to_the_final_array() -> None:
    diff, parts = OutputDiff(), []
    full = np.arange(10, dtype=np.int64).reshape(5, 2)
    for n in (0, 1, 1, 3, 5):
        delta = diff.delta({"rows": full[:n]}, final=False)
        if delta is not None:
            parts.append(delta["rows"])
    parts.append(diff.delta({"rows": full}, final=True)["rows"])  # type: ignore[index]
    np.testing.assert_array_equal(np.concatenate(parts), full)


def test_not_prefix_stable_waits_then_fails_at_the_end() -> None:
    diff = OutputDiff()
    assert diff.delta({"text": "Hello ,"}, final=False) == {"text": "Hello ,"}
    assert diff.delta({"text": "Hello, w"}, final=False) is None  # rewrote sent text: nothing sent, wait
    with pytest.raises(NotPrefixStable, match="not prefix-stable"):
        diff.delta({"text": "Hello, world"}, final=True)


def test_accumulate() -> None:
    so_far = accumulate(None, [np.array([1]), "a", b"x", np.array(1.0)])
    so_far = accumulate(so_far, [np.array([2, 3]), "b", b"y", np.array(2.0)])
    so_far = accumulate(so_far, [np.zeros(0, np.int64), "", b"", np.array(3.0)])
    assert so_far[0].tolist() == [1, 2, 3] and so_far[1:3] == ["ab", b"xy"] and float(so_far[3]) == 3.0


# --------------------------------------------------------------------------------------- MethodRunner


class EngineLikeBackend:
    """Streams each instance's token ids back a few per step (a step lasts ``STEP_S``: the consumer keeps up),
    in the engine's order: ``on_result`` of an instance that finished, then its piece with the finish reason."""

    batch_size = 4
    CHUNKS = (1, 2, 0)
    STEP_S = 0.01

    def check_instance(self, values):
        return values

    def run(self, instances):
        return self.run_streaming(instances, lambda i, r: None, [None] * len(instances))

    def run_streaming(self, instances, on_result, cancels, pieces: list[PieceSink | None] | None = None):
        rows = [np.asarray(v[0], np.int64) for v in instances]
        made, done, step = [0] * len(rows), [False] * len(rows), 0
        while not all(done):
            time.sleep(self.STEP_S)
            for i, row in enumerate(rows):
                if done[i]:
                    continue
                new = row[made[i]:made[i] + self.CHUNKS[step % len(self.CHUNKS)]]
                made[i] += len(new)
                finish = "length" if made[i] >= len(row) else None
                if finish:
                    done[i] = True
                    on_result(i, [row.copy()])
                if pieces is not None and pieces[i] is not None:
                    pieces[i].piece([new.copy()], finish)
            step += 1
        return [[row.copy()] for row in rows]


@pytest.fixture(scope="module")
def runner():
    loaded = load_servable(str(SERVABLES), "streamer")
    batcher = ModelBatcher(EngineLikeBackend(), "streamer", 0.0)
    yield MethodRunner(loaded.spec, {"streamer": batcher})
    batcher.close()


def test_runner_streams_pieces_that_add_up_to_the_plain_answer(runner: MethodRunner) -> None:
    instances = [{"text": t} for t in TEXTS]
    plain = runner.run("generate", instances)
    got: list[Piece] = []
    lock = threading.Lock()

    def emit(pieces: list[Piece]) -> None:
        with lock:
            got.extend(pieces)

    streamed = runner.run("generate", instances, stream=emit)
    assert [r["text"] for r in streamed] == [r["text"] for r in plain] == TEXTS  # type: ignore[index]
    for i, result in enumerate(plain):
        mine = [p for p in got if p.index == i]
        assert mine and all(p.error is None for p in mine)
        assert [p.finish for p in mine] == [None] * (len(mine) - 1) + ["length"]
        assert "".join(str(p.outputs["text"]) for p in mine) == result["text"]  # type: ignore[index]
        np.testing.assert_array_equal(np.concatenate([p.outputs["tokens"] for p in mine]),
                                      result["tokens"])  # type: ignore[index]
        if "\ufffd" not in result["text"]:  # type: ignore[index]
            assert all("\ufffd" not in str(p.outputs["text"]) for p in mine)
    assert len([p for p in got if p.index == 3]) >= 2  # "😀😀" came in pieces


def test_runner_reports_a_failed_instance_as_its_last_piece(runner: MethodRunner) -> None:
    got: list[Piece] = []
    results = runner.run("generate", [{"text": "ok"}, {"text": np.array([1.0])}], stream=got.extend)
    assert isinstance(results[1], InvalidInput)
    errors = [p for p in got if p.index == 1]
    assert len(errors) == 1 and errors[0].error is results[1]
    assert [p.finish for p in got if p.index == 0][-1] == "length"


def test_runner_refuses_to_stream_a_method_not_declared_stream(runner: MethodRunner) -> None:
    with pytest.raises(InvalidInput, match="does not support streaming"):
        runner.run("generate_plain", [{"text": "x"}], stream=lambda pieces: None)
    assert runner.run("generate_plain", [{"text": "x"}])[0]["text"] == "x"  # type: ignore[index]


# --------------------------------------------------------------------------------------- declaration


@pytest.mark.parametrize(("decorator", "fragment"), [
    ("register.register_method(output_names=['y'], stream=1)", "Parameter 'stream' should be bool"),
    ("register.register_method(output_names=['index'], stream=True)", "cannot have an output named index"),
    ("register.register_method(output_names=['finish_reason'], stream=True)", "cannot have an output named"),
])
def test_stream_declaration_errors(tmp_path: Path, decorator: str, fragment: str) -> None:
    (tmp_path / "svc").mkdir()
    (tmp_path / "svc" / "servable_config.py").write_text(
        f"from servable_framework.server import register\n\ndef f(x):\n    return x\n\n@{decorator}\n"
        f"def m(x):\n    return register.add_stage(f, x, outputs_count=1)\n")
    with pytest.raises(RuntimeError, match=fragment):
        load_servable(str(tmp_path), "svc")


def test_stream_flag_is_recorded(runner: MethodRunner) -> None:
    assert runner.spec.methods["generate"].stream and not runner.spec.methods["generate_plain"].stream
