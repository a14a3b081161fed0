"""The KV cache of one rank: preallocated per-row slots, grown by doubling, never concatenated per step.

Layout per layer: keys and values ``[slots, kv_heads, capacity, head_dim]``. The running rows occupy slots
``0 .. rows-1`` in row order (every rank holds the same rows in the same order). Row ``r`` has written
``lengths[r]`` columns; ``valid[r, c]`` says whether column ``c`` holds a real token (a prompt is left-padded
to its batch's length, and the padding columns stay masked for the row's life). A decode step writes one
column per row at ``lengths[r]``; attention reads columns ``0 .. max(lengths)`` of every row, masked by
``valid``. Rows that finish leave by compaction (the survivors move down, once per finishing event, not per
step), which also frees their columns.

`CacheView` is what one forward pass hands to the attention layers (Hugging Face's ``cache.update(k, v,
layer_idx)`` protocol) together with the attention mask of that pass (``view.mask``, boolean, True = attend).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class SlotKVCache:
    """Keys/values of every layer this rank holds, for up to ``slots`` rows of up to ``capacity`` tokens."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 slots: int = 8, capacity: int = 256) -> None:
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.slots, self.capacity = 0, 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.valid = torch.zeros(0, 0, dtype=torch.bool, device=device)
        self.lengths: list[int] = []  # per running row (host side: shapes are decided on the host)
        # the same on the device, kept in step by decode (+1) so that a step copies nothing host -> device
        self._lengths_dev: torch.Tensor | None = None
        self._grow(slots, capacity)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def _grow(self, slots: int, capacity: int) -> None:
        """Reallocate to at least (slots, capacity), doubling, keeping the running rows' columns."""
        new_slots, new_cap = max(self.slots, 1), max(self.capacity, 1)
        while new_slots < slots:
            new_slots *= 2
        while new_cap < capacity:
            new_cap *= 2
        if (new_slots, new_cap) == (self.slots, self.capacity):
            return
        n, width = self.rows, max(self.lengths, default=0)
        shape = (new_slots, self.kv_heads, new_cap, self.head_dim)
        for store in (self.keys, self.values):
            for layer in range(self.num_layers):
                fresh = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if store and n:
                    fresh[:n, :, :width] = store[layer][:n, :, :width]
                if len(store) > layer:
                    store[layer] = fresh
                else:
                    store.append(fresh)
        valid = torch.zeros(new_slots, new_cap, dtype=torch.bool, device=self.device)
        if n:
            valid[:n, :width] = self.valid[:n, :width]
        self.valid, self.slots, self.capacity = valid, new_slots, new_cap

    def clear(self) -> None:
        """No running rows (the buffers stay allocated for the next batch)."""
        self.lengths = []
        self._lengths_dev = None

    def prefill(self, valid: torch.Tensor) -> CacheView:
        """Append ``B`` rows whose prompts (left-padded to ``T``) are about to be prefilled together;
        ``valid`` [B, T] bool marks their real tokens. The view writes and reads only those rows."""
        count, width = valid.shape
        start = self.rows
        self._grow(start + count, width)
        rows = slice(start, start + count)
        self.valid[rows] = False
        self.valid[rows, :width] = valid
        self.lengths.extend([width] * count)
        self._lengths_dev = None
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        mask = causal[None] & valid[:, None, :]
        # a padding query attends to itself only: finite garbage that no real token ever reads (an all-masked
        # row would give NaN, and NaN times a zero attention weight is still NaN)
        mask |= torch.eye(width, dtype=torch.bool, device=self.device)[None]
        return CacheView(self, rows, None, width, mask[:, None])

    def decode(self) -> CacheView:
        """One new token for every running row, written at each row's own next column."""
        width = max(self.lengths) + 1
        self._grow(self.rows, width)
        n = self.rows
        cols = self._lengths_dev
        if cols is None:
            cols = torch.tensor(self.lengths, dtype=torch.long).to(self.device, non_blocking=True)
        index = torch.arange(n, device=self.device)
        self.valid[index, cols] = True
        self.lengths = [length + 1 for length in self.lengths]
        self._lengths_dev = cols + 1
        mask = self.valid[:n, :width][:, None, None, :]
        return CacheView(self, slice(0, n), (index, cols), width, mask)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (indices of running rows, ascending); they move down to slots 0..len-1."""
        self._lengths_dev = None
        if list(rows) == list(range(len(rows))):
            self.lengths = self.lengths[:len(rows)]
            return
        width = max((self.lengths[r] for r in rows), default=0)
        if rows and width:
            index = torch.tensor(list(rows), dtype=torch.long, device=self.device)
            m = len(rows)
            for store in (self.keys, self.values):
                for layer in range(self.num_layers):
                    store[layer][:m, :, :width] = store[layer][:, :, :width].index_select(0, index)
            self.valid[:m, :width] = self.valid[:, :width].index_select(0, index)
        # a slot's earlier occupant may have been longer: its columns past `width` must not stay valid for the
        # row that moved in (a row's columns past its own length are never valid)
        self.valid[:len(rows), width:] = False
        self.lengths = [self.lengths[r] for r in rows]


class CacheView:
    """One forward pass's access to the cache: ``update`` stores this pass's keys/values of a layer and returns
    every column the pass attends to; ``mask`` [rows, 1, queries, columns] (bool) is the pass's attention mask."""

    def __init__(self, cache: SlotKVCache, rows: slice, decode_at: tuple[torch.Tensor, torch.Tensor] | None,
                 width: int, mask: torch.Tensor) -> None:
        self.cache, self.rows, self.decode_at, self.width, self.mask = cache, rows, decode_at, width, mask

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        if self.decode_at is None:  # prefill: columns 0..T of the new rows
            t = key_states.shape[2]
            keys[self.rows, :, :t] = key_states
            values[self.rows, :, :t] = value_states
        else:  # decode: one column per row, at the row's own position
            index, cols = self.decode_at
            keys[index, :, cols] = key_states[:, :, 0]
            values[index, :, cols] = value_states[:, :, 0]
        return keys[self.rows, :, :self.width], values[self.rows, :, :self.width]

    def mask_for(self, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
        """The pass's mask as the attention implementation wants it: boolean for ``"sdpa"``; additive (0 where
        attended, the dtype's minimum elsewhere) for ``"eager"``, which adds its mask to the scores."""
        if attn_implementation == "sdpa":
            return self.mask
        return torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device).masked_fill(
            ~self.mask, torch.finfo(dtype).min)
