"""Omni attention mask (docs/SHOWO2.md §1.9): causal OR same image slot, against the naive construction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flashu_fx.config import get_config
from flashu_fx.layout import build_gen_batch
from flashu_fx.masks import decode_mask, omni_mask, pad_mask_to


def naive_omni_mask(offsets: list[int], seq_len: int, slot_len: int) -> torch.Tensor:
    """Upstream's recipe: lower-triangular ones, then ones on each row's image block. bool (M, 1, L, L)."""
    out = torch.tril(torch.ones(len(offsets), 1, seq_len, seq_len)).bool()
    for i, off in enumerate(offsets):
        out[i, 0, off : off + slot_len, off : off + slot_len] = True
    return out


@st.composite
def mask_cases(draw):
    seq_len = draw(st.integers(1, 64))
    slot_len = draw(st.integers(1, seq_len))
    offsets = draw(st.lists(st.integers(0, seq_len - slot_len), min_size=1, max_size=4))
    return offsets, seq_len, slot_len


@settings(deadline=None, max_examples=100)
@given(case=mask_cases())
def test_omni_mask_equals_naive(case):
    offsets, seq_len, slot_len = case
    mask = omni_mask(torch.tensor(offsets), seq_len, slot_len)
    assert mask.dtype == torch.bool and mask.shape == (len(offsets), 1, seq_len, seq_len)
    assert torch.equal(mask, naive_omni_mask(offsets, seq_len, slot_len))


@settings(deadline=None, max_examples=50)
@given(case=mask_cases())
def test_image_block_is_bidirectional_and_rest_causal(case):
    offsets, seq_len, slot_len = case
    mask = omni_mask(torch.tensor(offsets), seq_len, slot_len)[:, 0]
    for i, off in enumerate(offsets):
        assert bool(mask[i, off : off + slot_len, off : off + slot_len].all())
        outside = torch.ones(seq_len, dtype=torch.bool)
        outside[off : off + slot_len] = False
        # a query outside the slot never sees a later key; nothing sees a later key outside the slot
        later = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)
        assert not bool((mask[i] & later)[outside].any())
        assert not bool((mask[i] & later)[:, outside].any())
        assert bool(mask[i].diagonal().all())


def test_pads_never_attended_by_image_tokens():
    cfg = get_config("showo2-1.5b")
    batch = build_gen_batch(cfg, [[5, 6, 7], list(range(100, 400))])  # a short prompt, one truncated to 290
    for row in range(batch.tokens.shape[0]):
        tokens, off = batch.tokens[row], int(batch.offsets[row])
        slot = torch.zeros(cfg.max_seq_len, dtype=torch.bool)
        slot[off : off + cfg.image_slot_len] = True
        pads = tokens == cfg.specials.pad
        mask = batch.mask[row, 0]
        assert not bool(mask[slot][:, pads].any())
        # trailing pads affect only pads: no non-pad query attends to a pad key
        assert not bool(mask[~pads][:, pads].any())
    assert int((batch.tokens[0] == cfg.specials.pad).sum()) == 290 - 3


def test_bool_mask_equals_upstream_additive_mask():
    """SDPA with our bool mask == SDPA with upstream's additive mask (0 / -9.22e18)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 20, 8, generator=gen) for _ in range(3))
    mask = omni_mask(torch.tensor([2, 9]), 20, 7)
    additive = torch.zeros(mask.shape).masked_fill(~mask, float(torch.iinfo(torch.int64).min))
    out_bool = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out_add = F.scaled_dot_product_attention(q, k, v, attn_mask=additive)
    torch.testing.assert_close(out_bool, out_add, rtol=1e-6, atol=1e-6)
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.allclose(out_bool, causal, atol=1e-3)


def test_pad_mask_to_blocks_new_keys():
    mask = omni_mask(torch.tensor([1]), 6, 3)
    padded = pad_mask_to(mask, 10)
    assert padded.shape == (1, 1, 6, 10)
    assert torch.equal(padded[..., :6], mask) and not bool(padded[..., 6:].any())
    with pytest.raises(ValueError, match="cache length 4"):
        pad_mask_to(mask, 4)


def test_decode_mask_is_causal_over_the_cache():
    mask = decode_mask(torch.tensor([3, 4]), 7)
    expected = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert mask.shape == (1, 1, 2, 7) and torch.equal(mask[0, 0], expected)
