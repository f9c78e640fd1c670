"""repeat_calls: a loop's later calls skip Dynamo's non-differentiating guards, scoped to the call."""

from __future__ import annotations

import pytest
import torch

from flashu_fx.compiled.repeat_calls import full_guards, loop_call


def skipping_guards() -> bool:
    return torch._dynamo.eval_frame._is_skip_guard_eval_unsafe_stance()


def test_only_later_calls_skip_guards_and_the_stance_does_not_leak() -> None:
    with loop_call(0):
        assert not skipping_guards()
    with loop_call(3):
        assert skipping_guards()
        with full_guards():
            assert not skipping_guards()
        assert skipping_guards()
    assert not skipping_guards()


def test_a_loop_of_compiled_calls_gives_the_eager_results() -> None:
    torch._dynamo.reset()
    calls = []

    def backend(gm, example_inputs):
        calls.append(len(example_inputs))
        return gm.forward

    weight = torch.randn(4, 4)
    fn = torch.compile(lambda x: torch.tanh(x @ weight), backend=backend)
    x = torch.randn(2, 4)
    for k in range(4):
        with loop_call(k):
            got = fn(x)
        assert torch.equal(got, torch.tanh(x @ weight))
        x = got + 1.0
    assert len(calls) == 1  # one capture, the later calls replayed it
    torch._dynamo.reset()


def test_a_nested_compile_on_a_later_call_compiles_under_full_guards() -> None:
    """What the executors rely on: a part compiled for varying lengths, first used on a later call, must compile."""
    torch._dynamo.reset()
    outer = torch.compile(lambda x: x * 2, backend="eager")
    inner = torch.compile(lambda x: x + 1, backend="eager")
    x = torch.ones(3)
    with loop_call(0):
        outer(x)
    with loop_call(1):
        outer(x)
        with pytest.raises(RuntimeError, match="skip_guard_eval_unsafe"):
            inner(x)  # a first compile while guards are skipped is refused by torch
        with full_guards():
            assert torch.equal(inner(x), x + 1)
    torch._dynamo.reset()


def test_a_negative_call_index_is_refused() -> None:
    with pytest.raises(ValueError, match="index=-1"):
        loop_call(-1)
