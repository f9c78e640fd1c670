"""passes.norm_in_products against its eager twin, ``rms_norm`` and the products that read its row."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from captured import capture
from hypothesis import given, settings
from hypothesis import strategies as st

from flashu_fx.layers import rms_norm
from passes.graph_utils import DERIVED_BY
from passes.norm_in_products import PASS_NAME, fold_norm_into_products


def norm_then_products(x, g, w_merged, bias, w_gate, w_up):
    """A decode layer's two shapes of product on a normalised row: a merged q/k/v (an ``as_strided`` view of the
    first weight, bias added after) and a gate/up pair of plain weights."""
    n = rms_norm(x, g, 1e-6)
    rows = w_merged.shape[0]
    qkv = F.linear(n, torch.as_strided(w_merged, (rows, x.shape[-1]), (x.shape[-1], 1))) + bias
    return qkv, F.silu(F.linear(n, w_gate)) * F.linear(n, w_up, bias[: w_up.shape[0]])


def inputs(seed: int, hidden: int, merged: int, ffn: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1, 1, hidden), (hidden,), (merged, hidden), (merged,), (ffn, hidden), (ffn, hidden)]
    return [(torch.randn(*s, generator=gen) * (3 if i == 0 else 1)).to(dtype) for i, s in enumerate(shapes)]


def rewritten(gm) -> int:
    return sum(n.meta.get(DERIVED_BY) == PASS_NAME and n.target is F.linear for n in gm.graph.nodes)


@settings(deadline=None, max_examples=15)
@given(seed=st.integers(0, 10_000), hidden=st.sampled_from([8, 16, 48]), merged=st.integers(1, 40),
       ffn=st.integers(1, 40))
def test_matches_the_norm_then_the_products(seed, hidden, merged, ffn) -> None:
    args = inputs(seed, hidden, max(merged, ffn), ffn)
    gm, example = capture(norm_then_products, *args)
    want = gm(*example)
    assert fold_norm_into_products(gm) == 3 == rewritten(gm)
    assert not any(n.op == "call_method" and n.target == "mean" and n.kwargs.get("keepdim") for n in gm.graph.nodes)
    for got, expected in zip(gm(*example), want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bf16_within_rounding() -> None:
    args = inputs(1, 64, 48, 32, torch.bfloat16)
    gm, example = capture(norm_then_products, *args)
    want = [t.float() for t in gm(*example)]
    fold_norm_into_products(gm)
    for got, expected in zip(gm(*example), want, strict=True):
        torch.testing.assert_close(got.float(), expected, rtol=3e-2, atol=3e-2 * expected.abs().max().item())


def test_a_row_that_feeds_more_than_products_is_left_with_a_warning(caplog) -> None:
    def norm_used_twice(x, g, w):
        n = rms_norm(x, g, 1e-6)
        return F.linear(n, w), n.sum()

    gm, example = capture(norm_used_twice, *inputs(2, 8, 4, 4)[:3])
    before = gm.code
    with caplog.at_level(logging.WARNING, logger="passes.norm_in_products"):
        assert fold_norm_into_products(gm) == 0
    assert "also feeds something other than products" in caplog.text and gm.code == before


def test_a_norm_without_products_is_left_quietly(caplog) -> None:
    def final_norm(x, g, w):  # the decode step's last row is sliced before the lm_head
        return F.linear(rms_norm(x, g, 1e-6)[0, -1], w)

    gm, example = capture(final_norm, *inputs(3, 8, 4, 4)[:3])
    before = gm.code
    with caplog.at_level(logging.WARNING, logger="passes.norm_in_products"):
        assert fold_norm_into_products(gm) == 0
    warnings = [r for r in caplog.records if r.name == "passes.norm_in_products" and r.levelno >= logging.WARNING]
    assert warnings == [] and gm.code == before


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_the_norms_own_epsilon_is_kept(eps) -> None:
    def norm_linear(x, g, w):
        return F.linear(rms_norm(x, g, eps), w)

    x = torch.full((1, 1, 8), 1e-3)  # a tiny row: the epsilon dominates the statistic
    args = [x, torch.ones(8), torch.randn(4, 8, generator=torch.Generator().manual_seed(4))]
    gm, example = capture(norm_linear, *args)
    want = gm(*example)
    assert fold_norm_into_products(gm) == 1
    torch.testing.assert_close(gm(*example), want, rtol=1e-5, atol=1e-7)
