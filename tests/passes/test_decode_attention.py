"""passes.decode_attention against its eager twin, ``F.scaled_dot_product_attention`` with one query row."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from captured import capture
from hypothesis import given, settings
from hypothesis import strategies as st

from passes.decode_attention import decode_attention, decode_attention_as_reductions


def attention_inputs(seed: int, batch: int, kv_heads: int, group: int, slots: int, head_dim: int, mask: str):
    """q (B, KV * G, 1, d), the cache k, v (B, KV, C, d), and a mask of the kind named (None, additive, bool) in
    which every row keeps at least its first slot."""
    gen = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    q = torch.randn(batch, heads, 1, head_dim, generator=gen)
    k, v = (torch.randn(batch, kv_heads, slots, head_dim, generator=gen) for _ in range(2))
    keep = torch.rand(batch, heads, 1, slots, generator=gen) > 0.4
    keep[..., 0] = True
    if mask == "none":
        return q, k, v, None
    if mask == "bool":
        return q, k, v, keep
    additive = torch.zeros(1, 1, 1, slots).masked_fill(~keep[:1, :1], float("-inf"))  # the cache's (1, 1, 1, C)
    return q, k, v, additive


@settings(deadline=None, max_examples=40)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 2), kv_heads=st.integers(1, 4), group=st.integers(1, 4),
       slots=st.integers(1, 70), head_dim=st.sampled_from([4, 8, 16, 32]),
       mask=st.sampled_from(["none", "add", "bool"]), scale=st.sampled_from([None, 0.3]))
def test_matches_sdpa(seed, batch, kv_heads, group, slots, head_dim, mask, scale) -> None:
    q, k, v, attn_mask = attention_inputs(seed, batch, kv_heads, group, slots, head_dim, mask)
    gqa = group > 1
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=gqa)
    got = decode_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=gqa)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_rounds_once() -> None:
    """bf16 inputs: fp32 sums, one rounding at the end, so within bf16's rounding of the fp32 result."""
    q, k, v, mask = attention_inputs(1, 1, 2, 4, 50, 32, "add")
    exact = decode_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=mask.bfloat16(), enable_gqa=True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), exact, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(("kwargs", "shape", "match"), [
    ({"dropout_p": 0.1}, (1, 4, 1, 8), "no dropout"),
    ({"is_causal": True}, (1, 4, 1, 8), "no causal"),
    ({"enable_gqa": True}, (1, 4, 3, 8), "one query row"),
    ({}, (1, 4, 1, 8), "enable_gqa"),  # 4 query heads over 2 KV heads without enable_gqa
])
def test_clear_errors(kwargs, shape, match) -> None:
    k = v = torch.zeros(1, 2, 5, 8)
    with pytest.raises(ValueError, match=match):
        decode_attention(torch.zeros(shape), k, v, **kwargs)


def one_row_and_prefill(q1, q3, k, v, mask):
    """A decode-like attention (one row) and a prefill-like one (three rows) over the same cache."""
    a = F.scaled_dot_product_attention(q1, k, v, attn_mask=mask, enable_gqa=True)
    b = F.scaled_dot_product_attention(q3, k, v, enable_gqa=True)
    return a.sum() + b.sum(), a


def test_pass_rewrites_one_row_calls_only_and_keeps_the_result(caplog) -> None:
    q1, k, v, mask = attention_inputs(3, 1, 2, 2, 20, 8, "add")
    q3 = torch.randn(1, 4, 3, 8, generator=torch.Generator().manual_seed(4))
    gm, inputs = capture(one_row_and_prefill, q1, q3, k, v, mask)
    want = gm(*inputs)
    with caplog.at_level(logging.WARNING, logger="passes.decode_attention"):
        assert decode_attention_as_reductions(gm) == 1
    assert "rewrote 1 of 2" in caplog.text
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(decode_attention) == 1 and targets.count(F.scaled_dot_product_attention) == 1
    got = gm(*inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_pass_without_attention_warns_and_leaves_the_graph(caplog) -> None:
    gm, inputs = capture(lambda x: x * 2, torch.ones(3))
    before = gm.code
    with caplog.at_level(logging.WARNING, logger="passes.decode_attention"):
        assert decode_attention_as_reductions(gm) == 0
    assert "rewrote 0 of 0" in caplog.text and gm.code == before
