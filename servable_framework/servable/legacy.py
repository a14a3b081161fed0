"""MindSpore Serving 1.x's deprecated method API (contract §3.7): ``call_preprocess``, ``call_servable``, ...

Old ``servable_config.py`` files write a method as straight-line code::

    @register.register_method(output_names=["y"])
    def predict(image):
        x = register.call_preprocess(pre, image)
        y = register.call_servable(x)
        y = register.call_postprocess(post, y)
        return y

Each call is a thin wrapper over `add_stage`. Its ``outputs_count`` is not an argument: as MindSpore does, it
is read from the method's source (the number of names the call's result is assigned to), so
`register_method` parses the method first (`plan`) and each call takes the next count while the method is
traced. Rules and error texts are MindSpore's: at most one preprocess, one servable call, one postprocess, in
that order, a `call_servable` present, nothing but such assignments and the return, and exactly one declared
model.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

LEGACY_CALLS = ("call_preprocess", "call_preprocess_pipeline", "call_servable", "call_postprocess",
                "call_postprocess_pipeline")


@dataclass
class LegacyTrace:
    """What the calls of one method need while it is traced: the counts read from its source, in call order."""

    counts: list[int]
    done: list[str] = field(default_factory=list)  # "pre" / "servable" / "post", in the order they were called

    def next_count(self) -> int:
        return self.counts.pop(0) if self.counts else 1


def _call_name(node: ast.AST | None) -> str | None:
    if isinstance(node, ast.Call):
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        return name if name in LEGACY_CALLS else None
    return None


def plan(func: Callable[..., Any]) -> LegacyTrace | None:
    """None when ``func`` does not use the legacy calls; else its trace plan (raises on a forbidden shape)."""
    try:
        source = textwrap.dedent(inspect.getsource(func))
    except (OSError, TypeError):
        return None  # no source (e.g. defined in a REPL): only add_stage can work there
    tree = ast.parse(source)
    fdef = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if fdef is None:
        return None
    used = sorted({name for n in ast.walk(fdef) if (name := _call_name(n))}, key=LEGACY_CALLS.index)
    if not used:
        return None
    counts: list[int] = []
    for stmt in fdef.body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
            continue  # the docstring
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and _call_name(stmt.value):
            target = stmt.targets[0]
            counts.append(len(target.elts) if isinstance(target, (ast.Tuple, ast.List)) else 1)
            continue
        if isinstance(stmt, ast.Return):
            if _call_name(stmt.value) is not None:
                counts.append(1)
            continue
        names = ", ".join(used)
        raise RuntimeError(f"complex statements such as conditions and loops are not supported in register_method "
                           f"when the interface '{names}' is used, use 'add_stage' to replace '{names}'")
    if "call_servable" not in used:
        raise RuntimeError("Not find the invoke of 'call_servable'")
    return LegacyTrace(counts)


def check_order(trace: LegacyTrace, kind: str) -> None:
    """``kind`` ("pre", "servable", "post") is about to be traced: MindSpore's once-each, in-order rules."""
    if kind in trace.done:
        raise RuntimeError("call_servable should not be invoked more than once" if kind == "servable" else
                           f"call_{'preprocess' if kind == 'pre' else 'postprocess'} or "
                           f"call_{'preprocess' if kind == 'pre' else 'postprocess'}_pipeline should not be "
                           f"invoked more than once")
    if kind == "pre" and "servable" in trace.done:
        raise RuntimeError("call_servable should be invoked after call_preprocess")
    if kind == "pre" and "post" in trace.done:
        raise RuntimeError("call_postprocess or call_postprocess_pipeline should be invoked after call_preprocess")
    if kind == "servable" and "post" in trace.done:
        raise RuntimeError("call_postprocess or call_postprocess_pipeline should be invoked after call_servable")
    trace.done.append(kind)
