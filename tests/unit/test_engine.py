"""The engine's pure parts: the slot KV cache against a naive per-row cache, row stop rules, sampling params."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from servable_framework.engine.kv_cache import SlotKVCache
from servable_framework.engine.runner import _Row
from servable_framework.engine.sampling import SamplingParams

H, D = 2, 4


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_slot_cache_matches_a_naive_cache_through_prefill_decode_join_and_leave() -> None:
    """Rows prefilled in two groups (left-padded), decoded step by step while the cache grows, some leaving:
    every decode step's attention output equals attention over that row's own real tokens only."""
    torch.manual_seed(0)
    cache = SlotKVCache(num_layers=1, kv_heads=H, head_dim=D, dtype=torch.float32, device=torch.device("cpu"),
                        slots=1, capacity=2)  # tiny, so that both dimensions have to grow
    naive: list[tuple[torch.Tensor, torch.Tensor]] = []  # per running row: its real keys and values [H, L, D]

    def prefill(lengths: list[int]) -> None:
        width = max(lengths)
        valid = torch.zeros(len(lengths), width, dtype=torch.bool)
        for b, n in enumerate(lengths):
            valid[b, width - n:] = True
        k, v = torch.randn(len(lengths), H, width, D), torch.randn(len(lengths), H, width, D)
        view = cache.prefill(valid)
        keys, values = view.update(k, v, 0)
        assert keys.shape == (len(lengths), H, width, D) and view.mask.shape == (len(lengths), 1, width, width)
        # padding queries attend to themselves: no all-masked query row (NaN on some attention backends)
        assert view.mask.any(dim=-1).all()
        assert torch.isfinite(attend(torch.randn(len(lengths), H, width, D), keys, values, view.mask)).all()
        for b, n in enumerate(lengths):
            naive.append((k[b, :, width - n:], v[b, :, width - n:]))

    def decode() -> None:
        n = cache.rows
        q, k, v = torch.randn(n, H, 1, D), torch.randn(n, H, 1, D), torch.randn(n, H, 1, D)
        view = cache.decode()
        keys, values = view.update(k, v, 0)
        got = attend(q, keys, values, view.mask)
        for r in range(n):
            rk, rv = naive[r]
            naive[r] = (torch.cat([rk, k[r]], dim=1), torch.cat([rv, v[r]], dim=1))
            want = attend(q[r:r + 1], naive[r][0][None], naive[r][1][None], None)
            torch.testing.assert_close(got[r:r + 1], want, rtol=1e-5, atol=1e-6)

    def keep(rows: list[int]) -> None:
        cache.keep(rows)
        naive[:] = [naive[r] for r in rows]

    prefill([3, 5])
    for _ in range(3):
        decode()
    prefill([2, 7, 4])  # joiners: appended after the running rows
    decode()
    keep([0, 2, 4])  # rows 1 and 3 finished: the others move down
    for _ in range(6):
        decode()
    keep([1, 2])
    prefill([1])
    for _ in range(4):
        decode()
    assert cache.slots >= 5 and cache.capacity >= max(cache.lengths)
    assert cache.rows == 3


def row(max_new: int, stop: tuple[tuple[int, ...], ...] = ()) -> _Row:
    return _Row(0, 0, SamplingParams(max_new, stop=stop))


def test_row_stops_on_eos_length_and_stop_sequences_and_holds_back_a_possible_stop() -> None:
    r = row(10)
    for t in (5, 6):
        r.add(t, eos={9})
    r.add(9, eos={9})
    assert r.reason == "eos" and r.tokens == [5, 6]  # EOS is not part of the output

    r = row(3)
    for t in (1, 2, 3):
        r.add(t, eos=set())
    assert r.reason == "length" and r.tokens == [1, 2, 3]

    r = row(20, stop=((7, 8, 9),))
    streamed: list[int] = []
    for t in (1, 7, 8):
        r.add(t, eos=set())
        streamed += r.stream_delta()
    assert streamed == [1] and not r.reason  # 7, 8 could be the start of the stop sequence: held back
    r.add(4, eos=set())
    streamed += r.stream_delta()
    assert streamed == [1, 7, 8, 4]  # it was not: released
    for t in (7, 8, 9):
        r.add(t, eos=set())
        streamed += r.stream_delta()
    assert r.reason == "stop" and r.tokens == [1, 7, 8, 4] and streamed == r.tokens  # the stop is cut off


@pytest.mark.parametrize("vector, message", [
    ([0, 0, 1, 0, -1], "max_new_tokens must be a positive integer"),
    ([2.5, 0, 1, 0, -1], "max_new_tokens must be a positive integer"),
    ([4, -1, 1, 0, -1], "temperature must be >= 0"),
    ([4, 0, 0, 0, -1], r"top_p must be in \(0, 1\]"),
    ([4, 0, 1, 1.5, -1], "top_k must be a non-negative integer"),
    ([4, 0, 1, 0, np.nan], "5 finite numbers"),
    ([4, 0, 1, 0], "5 finite numbers"),
])
def test_sampling_params_refuse_bad_vectors(vector: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams.from_vector(np.asarray(vector, dtype=np.float64))


def test_sampling_params_round_trip_the_wire() -> None:
    p = SamplingParams.from_vector(np.array([8, 0.7, 0.9, 40, 7.0]), stop=[[1, 2], [], [3]])
    assert p == SamplingParams(8, 0.7, 0.9, 40, 7, ((1, 2), (3,)))
    assert SamplingParams.from_wire(p.to_wire()) == p


def test_a_row_moved_into_a_longer_rows_slot_does_not_see_its_columns() -> None:
    """Compaction moves a short row into the slot of a longer one that left: the old occupant's columns past
    the moved row's length must stay masked (else the moved row attends to a stranger's keys)."""
    torch.manual_seed(1)
    cache = SlotKVCache(num_layers=1, kv_heads=H, head_dim=D, dtype=torch.float32, device=torch.device("cpu"))
    naive: list[tuple[torch.Tensor, torch.Tensor]] = []
    for n in (10, 2, 3):  # three rows prefilled one after another: slots 0, 1, 2
        k, v = torch.randn(1, H, n, D), torch.randn(1, H, n, D)
        cache.prefill(torch.ones(1, n, dtype=torch.bool)).update(k, v, 0)
        naive.append((k[0], v[0]))
    cache.keep([1, 2])  # the long row leaves: rows of 2 and 3 tokens move down into slots 0 and 1
    naive = naive[1:]
    for _ in range(4):
        q, k, v = torch.randn(2, H, 1, D), torch.randn(2, H, 1, D), torch.randn(2, H, 1, D)
        view = cache.decode()
        keys, values = view.update(k, v, 0)
        got = attend(q, keys, values, view.mask)
        for r in range(2):
            naive[r] = (torch.cat([naive[r][0], k[r]], dim=1), torch.cat([naive[r][1], v[r]], dim=1))
            want = attend(q[r:r + 1], naive[r][0][None], naive[r][1][None], None)
            torch.testing.assert_close(got[r:r + 1], want, rtol=1e-5, atol=1e-6)
