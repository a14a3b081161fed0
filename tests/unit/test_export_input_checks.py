"""`local_model._cache_input_checks` and `_program_call`: an exported program's input checks (its pre-hook and
its ``_guards_fn``) run once per input signature, the call skips `torch.nn.Module`'s hook machinery, and both
still refuse every input the program does not take (against the same program without either)."""

from __future__ import annotations

import pytest
import torch

from servable_framework.worker.local_model import (
    _cache_input_checks,
    _flat_program,
    _program_call,
    _RememberedCheck,
    _RememberedGuards,
)


class Scale(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x * 2 + y


def _program() -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=2, max=8)
    return torch.export.export(Scale(), (torch.ones(4, 3), torch.ones(4, 3)),
                               dynamic_shapes={"x": {0: batch}, "y": {0: batch}})


def _outcome(module, *args):
    try:
        return module(*args)
    except Exception as exc:
        return type(exc)


def test_same_answers_and_refusals_as_the_plain_program() -> None:
    program = _program()
    plain, cached = program.module(), _cache_input_checks(program.module())
    fast = _program_call(_cache_input_checks(program.module()))
    assert any(isinstance(h, _RememberedCheck) for h in cached._forward_pre_hooks.values())
    assert isinstance(cached._guards_fn, _RememberedGuards)
    assert fast is not cached and not isinstance(fast, torch.nn.Module)  # the short call was taken
    cases = [
        (torch.ones(4, 3), torch.ones(4, 3)),
        (torch.ones(4, 3), torch.ones(4, 3)),  # the same signature again: served from the cache
        (torch.ones(9, 3), torch.ones(9, 3)),  # batch above the declared max
        (torch.ones(1, 3), torch.ones(1, 3)),  # below the min
        (torch.ones(4, 5), torch.ones(4, 5)),  # a static dim that differs
        (torch.ones(4, 3, dtype=torch.float64), torch.ones(4, 3, dtype=torch.float64)),
        (torch.ones(4, 3), torch.ones(5, 3)),  # dims that must be equal differ
        (torch.ones(4, 3),),  # too few inputs
        (torch.ones(4, 3), torch.ones(4, 3)),  # and a good one after the refusals
    ]
    for args in cases:
        want = _outcome(plain, *args)
        for got in (_outcome(cached, *args), _outcome(fast, *args)):
            if isinstance(want, torch.Tensor):
                assert isinstance(got, torch.Tensor) and torch.equal(want, got), args
            else:
                assert got is not None and not isinstance(got, torch.Tensor), (args, want)


def test_a_signature_is_checked_once() -> None:
    cached = _cache_input_checks(_program().module())
    hook = next(h for h in cached._forward_pre_hooks.values() if isinstance(h, _RememberedCheck))
    calls = []
    original = hook.check
    hook.check = lambda *a: (calls.append(1), original(*a))[1]
    for _ in range(3):
        cached(torch.ones(4, 3), torch.ones(4, 3))
    cached(torch.ones(6, 3), torch.ones(6, 3))
    assert len(calls) == 2
    # refused every time, whether by the hook (not remembered then) or by the guards the graph runs itself
    for _ in range(2):
        with pytest.raises(Exception):  # noqa: B017 - either refusal is right; the text is torch's
            cached(torch.ones(9, 3), torch.ones(9, 3))


def test_the_guards_run_once_per_signature_and_still_refuse() -> None:
    module = _cache_input_checks(_program().module())
    calls = []

    class Counted(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            calls.append(1)
            return self.inner(*args)

    module._guards_fn.guards = Counted(module._guards_fn.guards)
    call = _program_call(module)  # (the flat call takes the guards module as it is now)
    for _ in range(3):
        call(torch.ones(4, 3), torch.ones(4, 3))
    call(torch.ones(6, 3), torch.ones(6, 3))
    assert len(calls) == 2
    for _ in range(2):  # not remembered: refused each time
        with pytest.raises(Exception):  # noqa: B017 - the text is torch's
            call(torch.ones(9, 3), torch.ones(9, 3))


def test_a_global_module_hook_sends_calls_the_long_way() -> None:
    call = _program_call(_cache_input_checks(_program().module()))
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, out: seen.append(type(m).__name__))
    try:
        out = call(torch.ones(4, 3), torch.ones(4, 3))
    finally:
        handle.remove()
    assert torch.equal(out, torch.ones(4, 3) * 3)
    assert seen  # the hook saw the call: it went through torch.nn.Module.__call__
    count = len(seen)
    call(torch.ones(4, 3), torch.ones(4, 3))
    assert len(seen) == count  # removed: the short call again


def test_a_program_with_other_hooks_keeps_the_module_call() -> None:
    module = _cache_input_checks(_program().module())
    module.register_forward_hook(lambda m, a, out: None)
    assert _program_call(module) is module


class TwoOut(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + y, x * y


class Nested(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor]]:
        return x + y, (x * y,)


def test_flat_programs_run_their_graph_without_pytree_and_answer_the_same() -> None:
    """Positional tensors in, a tensor or a flat tuple out: the graph runs without the pytree wrapping and the
    in-graph guards call (`_flat_program`), with the same outputs and structure as the program; a nested output
    keeps the program's own forward."""
    x, y = torch.arange(6.0).reshape(2, 3), torch.full((2, 3), 0.5)
    for module_cls, flat in ((Scale, True), (TwoOut, True), (Nested, False)):
        program = torch.export.export(module_cls(), (x, y))
        assert (_flat_program(_cache_input_checks(program.module())) is not None) is flat, module_cls
        plain = program.module()
        call = _program_call(_cache_input_checks(program.module()))
        for _ in range(2):
            want, got = plain(x, y), call(x, y)
            assert type(want) is type(got)
            for w, g in zip(torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got)):
                assert torch.equal(w, g)
        with pytest.raises(Exception):  # noqa: B017 - the text is torch's
            call(torch.ones(3, 3), y)  # a static dim that differs: still refused
