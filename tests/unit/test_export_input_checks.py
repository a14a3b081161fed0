"""`local_model._cache_input_checks`: an exported program's input check runs once per input signature, and
still refuses every input the program does not take (against the same program without the cache)."""

from __future__ import annotations

import pytest
import torch

from servable_framework.worker.local_model import _cache_input_checks, _RememberedCheck


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
    assert any(isinstance(h, _RememberedCheck) for h in cached._forward_pre_hooks.values())
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
        want, got = _outcome(plain, *args), _outcome(cached, *args)
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
