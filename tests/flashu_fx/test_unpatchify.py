"""Output layout (docs/SHOWO2.md §1.7) and input patch order (§1.3), checked on index tensors.

Output: feature f of token k is channel f % 16 of raster pixel q = 4k + f // 16 (NOT a 2x2 patch).
Input:  token k is the 2x2 latent patch at (k // (w/2), k % (w/2)).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashu_fx.model import PatchEmbed, unpatchify

C, P = 16, 2


def index_tokens(batch: int, num_tokens: int) -> torch.Tensor:
    """tokens[i, k, f] = a unique id (i, k, f) -> (batch, tokens, 64) float64 (exact integers)."""
    return torch.arange(batch * num_tokens * P * P * C, dtype=torch.float64).view(batch, num_tokens, P * P * C)


def expected_unpatchify(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The documented rule written element by element."""
    batch, num_tokens, features = tokens.shape
    out = torch.full((batch, C, h, w), float("nan"), dtype=tokens.dtype)
    for k in range(num_tokens):
        for f in range(features):
            q = 4 * k + f // C
            out[:, f % C, q // w, q % w] = tokens[:, k, f]
    return out


@pytest.mark.parametrize("hw", [(54, 54), (64, 64)])
def test_unpatchify_index_rule(hw):
    h, w = hw
    tokens = index_tokens(2, h * w // 4)
    out = unpatchify(tokens, hw, C)
    assert out.shape == (2, C, h, w)
    assert torch.equal(out, expected_unpatchify(tokens, h, w))


def test_unpatchify_432_token_wraps_across_rows():
    """At 54 x 54 token 13 covers raster pixels 52..55: the last two of row 0 and the first two of row 1."""
    tokens = index_tokens(1, 729)
    out = unpatchify(tokens, (54, 54), C)
    token = tokens[0, 13].view(4, C)  # (pixel in group, channel)
    got = torch.stack([out[0, :, 0, 52], out[0, :, 0, 53], out[0, :, 1, 0], out[0, :, 1, 1]])
    assert torch.equal(got, token)


@settings(deadline=None, max_examples=40)
@given(hh=st.integers(1, 20), ww=st.integers(1, 20), batch=st.integers(1, 3))
def test_unpatchify_rule_any_grid(hh, ww, batch):
    h, w = 2 * hh, 2 * ww
    tokens = index_tokens(batch, hh * ww)
    assert torch.equal(unpatchify(tokens, (h, w), C), expected_unpatchify(tokens, h, w))


def test_unpatchify_keeps_dtype():
    tokens = torch.randn(1, 16, 64, dtype=torch.bfloat16)
    assert unpatchify(tokens, (8, 8), C).dtype == torch.bfloat16


def selecting_patch_embed() -> PatchEmbed:
    """A PatchEmbed whose output feature (c, i, j) copies latent channel c at offset (i, j) of its patch."""
    embed = PatchEmbed(C, C * P * P, P)
    with torch.no_grad():
        embed.proj.weight.copy_(torch.eye(C * P * P).view(C * P * P, C, P, P))
        embed.proj.bias.zero_()
    return embed


@settings(deadline=None, max_examples=30)
@given(hh=st.integers(1, 16), ww=st.integers(1, 16))
def test_patch_embed_token_order(hh, ww):
    h, w = 2 * hh, 2 * ww
    latents = torch.arange(2 * C * h * w, dtype=torch.float32).view(2, C, h, w)
    with torch.no_grad():
        tokens = selecting_patch_embed()(latents)
    assert tokens.shape == (2, hh * ww, C * P * P)
    for k in range(hh * ww):
        row, col = k // (w // 2), k % (w // 2)
        patch = latents[:, :, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2]  # (2, C, 2, 2)
        assert torch.equal(tokens[:, k], patch.reshape(2, -1)), f"token {k}"


def test_input_and_output_layouts_differ_at_432():
    """The documented mismatch: unpatchify is not the inverse of the patch embedding."""
    latents = torch.arange(C * 54 * 54, dtype=torch.float32).view(1, C, 54, 54)
    with torch.no_grad():
        tokens = selecting_patch_embed()(latents)  # features ordered (c, i, j)
    as_output = tokens.view(1, 729, C, P * P).transpose(2, 3).reshape(1, 729, P * P * C)  # features (i, j, c)
    assert not torch.equal(unpatchify(as_output, (54, 54), C), latents)


def test_extract_velocity_drops_the_time_token(tiny_model):
    cfg = tiny_model.config
    h, w = cfg.latent_size
    n = h * w // 4
    seq_len = cfg.max_seq_len
    v_tokens = torch.randn(2, seq_len, cfg.patch_dim, generator=torch.Generator().manual_seed(0))
    offsets = torch.tensor([3, 10])
    out = tiny_model.extract_velocity(v_tokens, offsets, (h, w))
    for i, off in enumerate(offsets.tolist()):
        expected = unpatchify(v_tokens[i : i + 1, off + 1 : off + 1 + n], (h, w), C)
        assert torch.equal(out[i : i + 1], expected)
