"""The helpers the passes share: the fake propagation that checks a rewrite without specialising the capture."""

from __future__ import annotations

import operator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from passes.graph_utils import captured_value, placeholder, placeholders, propagate_fake
from tests.passes.captured import capture


def captured_with_symbolic_rows(rows: int) -> tuple[fx.GraphModule, fx.Node]:
    """``t * 2`` captured with its row count a symbol, and the ``t`` input."""
    t = torch.randn(rows, 4)
    torch._dynamo.mark_dynamic(t, 0)
    gm, _ = capture(lambda t: t * 2, t)
    return gm, placeholder(gm, "l_t_")


def tie_rows_to_example(gm: fx.GraphModule, t: fx.Node, rows: int) -> None:
    """Append ``t + zeros(rows, 4)``: it only runs when the symbolic row count equals ``rows``, so propagating it
    evaluates that equality, the kind of check that makes a ShapeEnv replace the symbol by the example's value."""
    with gm.graph.inserting_after(t):
        zeros = gm.graph.call_function(torch.zeros, (rows, 4))
    with gm.graph.inserting_after(zeros):
        gm.graph.call_function(operator.add, (t, zeros))
    gm.recompile()


def row_symbol_free(t: fx.Node) -> bool:
    return bool(captured_value(t).shape[0].node.expr.free_symbols)


@settings(max_examples=6, deadline=None)
@given(rows=st.integers(2, 64))
def test_propagation_keeps_the_capture_symbolic(rows: int) -> None:
    gm, t = captured_with_symbolic_rows(rows)
    assert row_symbol_free(t)
    tie_rows_to_example(gm, t, rows)
    propagate_fake(gm)
    assert row_symbol_free(t), "the check tied the captured row count to the example's value"
    added = next(n for n in gm.graph.nodes if n.target is operator.add)
    assert tuple(added.meta["val"].shape) == (rows, 4)


def test_an_unguarded_propagation_would_specialise_it() -> None:
    """The hazard ``propagate_fake`` guards against: plain FakeTensorProp in the inputs' mode specialises."""
    gm, t = captured_with_symbolic_rows(9)
    tie_rows_to_example(gm, t, 9)
    inputs = [captured_value(n) for n in placeholders(gm)]
    FakeTensorProp(gm, captured_value(t).fake_mode).propagate_dont_convert_inputs(*inputs)
    assert not row_symbol_free(t)


def test_propagation_without_fake_inputs_is_a_lookup_error() -> None:
    gm = fx.symbolic_trace(lambda x: x + 1)
    with pytest.raises(LookupError, match="no fake tensors"):
        propagate_fake(gm)


def test_a_graph_that_does_not_hold_raises_its_own_error() -> None:
    gm, t = captured_with_symbolic_rows(5)
    tie_rows_to_example(gm, t, 6)  # (s0, 4) + (6, 4) with s0 = 5: no broadcast
    with pytest.raises(RuntimeError, match="must match the size"):
        propagate_fake(gm)
