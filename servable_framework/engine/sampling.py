"""Sampling parameters and the batched sampler of the output rank.

The sampler works on the shard's device on all rows at once: greedy rows take the argmax, the others go
through temperature, top-k (a `topk` of the largest k asked for, no sort) and top-p (a sort only when some
row asks for it), then draw with the exponential-race trick (``argmax(probs / q)``, ``q ~ Exp(1)``; no
`torch.multinomial`, which syncs with the host). Rows with a seed draw their noise from their own
`torch.Generator`, so a seeded row gives the same tokens alone or in any batch; that is the only loop over
rows, and it runs only over seeded ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one row is decoded. ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` switch those
    filters off; ``seed < 0`` draws from torch's global RNG. ``stop`` lists token-id sequences that end the row
    (the matched sequence is not part of the output)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = -1
    stop: tuple[tuple[int, ...], ...] = field(default=())

    @classmethod
    def from_vector(cls, values: np.ndarray, stop: Sequence[Sequence[int]] = ()) -> SamplingParams:
        """From ``[max_new_tokens, temperature, top_p, top_k, seed]``; `ValueError` with the reason otherwise."""
        opts = values.astype(np.float64).reshape(-1) if values.dtype.kind in "iuf" else None
        if opts is None or opts.shape != (5,) or not np.isfinite(opts).all():
            raise ValueError("sampling must be 5 finite numbers [max_new_tokens, temperature, top_p, top_k, seed]")
        max_new, temperature, top_p, top_k, seed = (float(x) for x in opts)
        if max_new < 1 or max_new != int(max_new):
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0 or top_k != int(top_k) or seed != int(seed):
            raise ValueError("top_k must be a non-negative integer and seed an integer")
        return cls(int(max_new), temperature, top_p, int(top_k), int(seed), tuple(tuple(s) for s in stop if s))

    def to_wire(self) -> list[Any]:
        return [self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.seed, [list(s) for s in self.stop]]

    @classmethod
    def from_wire(cls, raw: list[Any]) -> SamplingParams:
        return cls(int(raw[0]), float(raw[1]), float(raw[2]), int(raw[3]), int(raw[4]),
                   tuple(tuple(int(t) for t in s) for s in raw[5]))


def request_number(value: object, name: str, kind: type[int] | type[float], default: float) -> float:
    """A single number from a request input (``None``: ``default``); `ValueError` naming the input otherwise."""
    if value is None:
        return default
    arr = np.asarray(value).reshape(-1)
    if arr.size != 1 or arr.dtype.kind not in "biuf":
        raise ValueError(f"'{name}' must be a single number")
    number = arr[0].item()
    if kind is int and float(number) != int(number):
        raise ValueError(f"'{name}' must be an integer, got {number}")
    return kind(number)


def sampling_vector(max_new_tokens: object, temperature: object, top_p: object, top_k: object, seed: object, *,
                    default_max_new_tokens: int, max_new_tokens_cap: int) -> np.ndarray:
    """A servable's preprocess: request inputs (each may be None) -> the ``[max_new_tokens, temperature, top_p,
    top_k, seed]`` float64 vector an LLM instance carries (`SamplingParams.from_vector` reads it back on stage 0).
    Greedy by default; `ValueError` with a client-facing text for bad values."""
    n_new = int(request_number(max_new_tokens, "max_new_tokens", int, default_max_new_tokens))
    if not 1 <= n_new <= max_new_tokens_cap:
        raise ValueError(f"max_new_tokens {n_new} is out of range [1, {max_new_tokens_cap}] (the server cap)")
    temp = request_number(temperature, "temperature", float, 0.0)
    p = request_number(top_p, "top_p", float, 1.0)
    k = request_number(top_k, "top_k", int, 0)
    s = request_number(seed, "seed", int, -1)
    if temp < 0 or not 0 < p <= 1 or k < 0:
        raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0")
    return np.array([n_new, temp, p, k, s], dtype=np.float64)


def check_fits_context(prompt_tokens: int, sampling: np.ndarray, context: int) -> None:
    """A servable's preprocess: `ValueError` (a 400 for the client) when the prompt plus the request's
    ``max_new_tokens`` (``sampling[0]``, see `sampling_vector`) cannot fit the model's context, so such a request
    never reaches the Agents."""
    n_new = int(sampling[0])
    if prompt_tokens + n_new > context:
        raise ValueError(f"the prompt is {prompt_tokens} tokens and max_new_tokens is {n_new}: {prompt_tokens + n_new}"
                         f" is over the model's context of {context} tokens; shorten the prompt or lower "
                         f"max_new_tokens")


class Sampler:
    """Per-row sampling state of the running rows (in row order) and the batched draw."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.params: list[SamplingParams] = []
        self.generators: list[torch.Generator | None] = []
        self._tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def add(self, params: Sequence[SamplingParams]) -> None:
        """Append rows."""
        for p in params:
            self.params.append(p)
            self.generators.append(torch.Generator(self.device).manual_seed(p.seed) if p.seed >= 0 else None)
        self._tensors = None

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (indices into the current rows, in order)."""
        self.params = [self.params[i] for i in rows]
        self.generators = [self.generators[i] for i in rows]
        self._tensors = None

    def _row_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(temperature, top_p, top_k, greedy) per row on the device; rebuilt only when the rows change, so a
        decode step copies nothing from the host."""
        if self._tensors is None:
            temps = [p.temperature if p.temperature > 0 else 1.0 for p in self.params]
            self._tensors = (torch.tensor(temps, dtype=torch.float32, device=self.device),
                             torch.tensor([p.top_p for p in self.params], dtype=torch.float32, device=self.device),
                             torch.tensor([p.top_k for p in self.params], dtype=torch.int64, device=self.device),
                             torch.tensor([p.temperature == 0 for p in self.params], device=self.device))
        return self._tensors

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """One token per row (``logits`` [rows, vocab]); int64 [rows] on the device."""
        logits = logits.float()
        greedy = torch.argmax(logits, dim=-1)
        greedy_rows = [p.temperature == 0 for p in self.params]
        if all(greedy_rows):
            return greedy
        temps, top_p, top_k, greedy_mask = self._row_tensors()
        scores = logits / temps[:, None]
        k_max = max((p.top_k for p in self.params if p.top_k > 0), default=0)  # host side: no device sync
        scores = _filter(scores, top_k if k_max else None, k_max,
                         top_p if any(p.top_p < 1 for p in self.params) else None)
        probs = torch.softmax(scores, dim=-1)
        noise = torch.empty_like(probs).exponential_()
        for row, gen in enumerate(self.generators):
            if gen is not None and not greedy_rows[row]:
                noise[row].exponential_(generator=gen)
        sampled = torch.argmax(probs / noise, dim=-1)
        return torch.where(greedy_mask, greedy, sampled)


def _filter(scores: torch.Tensor, top_k: torch.Tensor | None, k_max: int, top_p: torch.Tensor | None
            ) -> torch.Tensor:
    """Hugging Face's order: top-k (``k_max``: the largest k asked for), then top-p (the most likely token
    always stays)."""
    vocab = scores.shape[-1]
    if top_k is not None:
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
        if k_max < vocab:
            top = torch.topk(scores, k_max, dim=-1).values
            kth = top.gather(1, (k.clamp(max=k_max) - 1)[:, None])
            scores = scores.masked_fill((scores < kth) & (k < vocab)[:, None], -math.inf)
    if top_p is not None:
        ordered, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p[:, None]
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        scores = scores.masked_fill(drop, -math.inf)
    return scores


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One row, as the batched sampler draws it (replays a seeded row from its recorded logits)."""
    sampler = Sampler(logits.device)
    sampler.params, sampler.generators = [params], [generator]
    return int(sampler.sample(logits.view(1, -1))[0])
