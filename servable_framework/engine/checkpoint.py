"""Reading a rank's slices of a Hugging Face safetensors checkpoint into a meta-device skeleton.

Never the whole tensor when a slice is enough (safetensors ``get_slice``), never ``torch.load``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from servable_framework.crypto import safe_open  # safetensors' own; decrypts in memory with a dec_key
from servable_framework.engine.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelHead


def context_length(path: str | Path, limit: int | None = None) -> int:
    """The longest sequence (prompt + generated tokens) the checkpoint's model takes: ``max_position_embeddings``
    of its ``config.json`` (of ``text_config`` for multimodal models), lowered to ``limit`` when given (a
    deployment's own cap, like vLLM's ``max_model_len``)."""
    config = json.loads((Path(path) / "config.json").read_text())
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    length = text.get("max_position_embeddings") or config.get("max_position_embeddings")
    if not isinstance(length, int) or length <= 0:
        raise ValueError(f"{path}/config.json names no max_position_embeddings")
    return min(length, limit) if limit else length


class CheckpointReader:
    """Reads (slices of) tensors from a checkpoint directory: one ``model.safetensors`` or a sharded one with
    ``model.safetensors.index.json``. ``prefixes`` maps a logical part ("text", "vision") to the candidate key
    prefixes, the first one found in the checkpoint wins (Qwen2.5-VL exists with ``model.`` and with the
    transformers-5 ``model.language_model.`` layout)."""

    def __init__(self, path: str | Path, prefixes: dict[str, tuple[str, ...]] | None = None) -> None:
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {k: self.path / v for k, v in weight_map.items()}
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                self._file_of = dict.fromkeys(f.keys(), single)
        else:
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {self.path}")
        self._handles: dict[Path, Any] = {}
        self.prefix: dict[str, str] = {}
        for part, candidates in (prefixes or {}).items():
            self.prefix[part] = next((p for p in candidates if any(k.startswith(p) for k in self._file_of)),
                                     candidates[-1])

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def key(self, part: str, name: str) -> str:
        return self.prefix[part] + name

    def _slice(self, key: str) -> Any:
        if key not in self._file_of:
            raise KeyError(f"tensor '{key}' not found in checkpoint {self.path}")
        file = self._file_of[key]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file].get_slice(key)

    def read(self, key: str, dim: int | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The whole tensor, or only ``[rows[0]:rows[1]]`` along ``dim`` (0 or 1)."""
        sl = self._slice(key)
        if dim is None or rows is None:
            out = sl[:]
        else:
            a, b = rows
            out = sl[a:b] if dim == 0 else sl[:, a:b]
        assert isinstance(out, torch.Tensor)
        return out

    def close(self) -> None:
        self._handles.clear()


def load_module_(module: nn.Module, reader: CheckpointReader, key_of: Callable[[str], str], device: torch.device,
                 dtype: torch.dtype) -> None:
    """Fill every parameter of ``module`` (a meta skeleton) from the checkpoint, slicing parallel layers.
    ``key_of(name)`` maps a parameter name relative to ``module`` to its checkpoint key."""
    state = {}
    for mod_name, mod in module.named_modules():
        for p_name, param in mod.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            key = key_of(name)
            if isinstance(mod, (ColumnParallelLinear, VocabParallelHead)):
                t = reader.read(key, 0, mod.rows)
            elif isinstance(mod, RowParallelLinear) and p_name == "weight":
                t = reader.read(key, 1, mod.cols)
            else:
                t = reader.read(key)
            if tuple(t.shape) != tuple(param.shape):
                raise ValueError(f"checkpoint tensor '{key}' has shape {tuple(t.shape)}, expected {tuple(param.shape)}")
            state[name] = t.to(device=device, dtype=dtype)
    module.load_state_dict(state, strict=True, assign=True)
    for p in module.parameters():
        p.requires_grad_(False)


def torch_dtype(value: object, default: torch.dtype) -> torch.dtype:
    """``"bfloat16"`` / ``"torch.float32"`` / a dtype -> the dtype (``default`` for None)."""
    if value is None:
        return default
    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {value!r}")
    return dtype


def generation_config(path: Path) -> dict[str, Any]:
    """The checkpoint's ``generation_config.json`` (empty when there is none)."""
    file = path / "generation_config.json"
    data = json.loads(file.read_text()) if file.is_file() else {}
    return data if isinstance(data, dict) else {}
