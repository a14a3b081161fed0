"""Argument checks with MindSpore Serving's messages (contract §3, ``check_type.py``). All raise RuntimeError."""

from __future__ import annotations

from typing import Any


def check_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise RuntimeError(f"Parameter '{name}' should be str, but actually {type(value)}")
    if not value:
        raise RuntimeError(f"Parameter '{name}' should not be empty str")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RuntimeError(f"Parameter '{name}' should be bool, but actually {type(value)}")
    return value


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RuntimeError(f"Parameter '{name}' should be int, but actually {type(value)}")
    if maximum is not None and minimum is not None and not minimum <= value <= maximum:
        raise RuntimeError(f"Parameter '{name}' should be in range [{minimum},{maximum}]")
    if minimum is not None and value < minimum:
        raise RuntimeError(f"Parameter '{name}' should be >= {minimum}")
    return value


def check_str_list(name: str, value: Any) -> list[str]:
    """str or list/tuple of unique non-empty str."""
    if isinstance(value, str):
        return [check_str(name, value)]
    if not isinstance(value, (list, tuple)):
        raise RuntimeError(f"Parameter '{name}' should be str or tuple/list of str, but actually {type(value)}")
    seen: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise RuntimeError(f"The item of parameter '{name}' should be str, but actually {type(item)}")
        if not item:
            raise RuntimeError(f"The item of parameter '{name}' should not be empty str")
        if item in seen:
            raise RuntimeError(f"The item value '{item}' in parameter '{name}' should not be repeated")
        seen.append(item)
    return seen


def check_int_list(name: str, value: Any, minimum: int = 0) -> list[int]:
    """int or list/tuple of unique ints >= minimum."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [check_int(name, value, minimum)]
    if not isinstance(value, (list, tuple)):
        raise RuntimeError(f"Parameter '{name}' should be int or tuple/list of int, but actually {type(value)}")
    seen: list[int] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int):
            raise RuntimeError(f"The item of parameter '{name}' should be int, but actually {type(item)}")
        if item < minimum:
            raise RuntimeError(f"The item value '{item}' in parameter '{name}' should be >= {minimum}")
        if item in seen:
            raise RuntimeError(f"The item value '{item}' in parameter '{name}' should not be repeated")
        seen.append(item)
    return seen
