"""Diffusion head (docs/SHOWO2.md §1.4 and §1.6): time sinusoid, llama3 RoPE scaling, a modulated block against an
independent reference (modulation only inside the image slot), FinalLayer."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from random_weights import randomize_

from flashu_fx.config import get_config
from flashu_fx.diffusion_head import FinalLayer, ModulatedAttentionBlock, TimestepEmbedder, in_slot_mask
from flashu_fx.layers import llama3_inv_freq, rope_cos_sin
from flashu_fx.masks import omni_mask

TINY = get_config("tiny")
# The real head's per-head geometry (head_dim 64, GQA group 4) on a narrow width.
REAL_HEADS = dataclasses.replace(
    TINY, head_hidden_size=256, head_num_heads=4, head_num_kv_heads=1, head_dim_head=64, head_intermediate_size=320
)
CONFIGS = pytest.mark.parametrize("cfg", [TINY, REAL_HEADS], ids=["tiny", "head_dim64"])


# ---- time embedding -------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_timestep_sinusoid_is_cos_first_on_raw_t(t):
    with torch.device("meta"):  # the sinusoid has no weights; skip initialising the 2048-wide MLP
        embedder = TimestepEmbedder(2048, 256)
    emb = embedder.sinusoid(torch.tensor([t]))
    assert emb.shape == (1, 256) and emb.dtype == torch.float32
    expected = [math.cos(t * math.exp(-math.log(10000) * j / 128)) for j in range(128)]
    expected += [math.sin(t * math.exp(-math.log(10000) * j / 128)) for j in range(128)]
    torch.testing.assert_close(emb[0], torch.tensor(expected), rtol=0, atol=1e-6)


def test_timestep_embedder_casts_the_fp32_sinusoid_to_the_weights():
    emb = TimestepEmbedder(64, 32).to(torch.bfloat16)
    t = torch.tensor([0.0, 0.3, 1.0])
    expected = emb.mlp(emb.sinusoid(t).to(torch.bfloat16))
    out = emb(t)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    assert not torch.equal(out[0], out[2])  # t reaches the output


# ---- llama3-scaled RoPE of the head ---------------------------------------------------------------------
def test_llama3_inv_freq_scaling_per_index():
    inv = llama3_inv_freq(64, 500_000.0).double()
    base = torch.tensor([500_000.0 ** (-2 * j / 64) for j in range(32)], dtype=torch.float64)
    ratio = inv / base
    assert inv.shape == (32,)
    torch.testing.assert_close(ratio[:15], torch.ones(15, dtype=torch.float64), rtol=1e-6, atol=0)
    documented = torch.tensor([0.6056, 0.3037, 0.1034], dtype=torch.float64)  # docs/SHOWO2.md §1.6, to 4 decimals
    torch.testing.assert_close(ratio[15:18], documented, rtol=0, atol=5e-5)
    torch.testing.assert_close(ratio[18:], torch.full((14,), 1 / 32, dtype=torch.float64), rtol=1e-6, atol=0)
    assert llama3_inv_freq(64, 500_000.0).dtype == torch.float32


# ---- reference block --------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE written pairwise: dim i is paired with dim i + d/2. x: (M, heads, L, d)."""
    half = x.shape[-1] // 2
    angle = torch.arange(x.shape[-2], dtype=torch.float64)[:, None] * inv_freq.double()[None]  # (L, d/2)
    cos, sin = angle.cos().float(), angle.sin().float()
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def reference_attention(attn, x: torch.Tensor, inv_freq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m, n, _ = x.shape
    hq, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = (x @ attn.q_proj.weight.T).view(m, n, hq, d)
    k = (x @ attn.k_proj.weight.T).view(m, n, hkv, d)
    v = (x @ attn.v_proj.weight.T).view(m, n, hkv, d).transpose(1, 2)
    q = rotate(rms_norm(q, attn.q_norm.weight, 1e-6).transpose(1, 2), inv_freq)  # qk-norm before RoPE
    k = rotate(rms_norm(k, attn.k_norm.weight, 1e-6).transpose(1, 2), inv_freq)
    k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    scores = scores.masked_fill(~mask, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(m, n, hq * d)
    return out @ attn.o_proj.weight.T


def reference_mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T


def reference_block(block, x, mods, inv_freq, mask, eps):
    """mods: per-position (M, L, D) shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
    y = rms_norm(x, block.input_layernorm.weight, eps) * (1 + scale_msa) + shift_msa
    h = x + gate_msa * reference_attention(block.self_attn, y, inv_freq, mask)
    y = rms_norm(h, block.post_attention_layernorm.weight, eps) * (1 + scale_mlp) + shift_mlp
    return h + gate_mlp * reference_mlp(block.mlp, y)


def slot_modulation(vectors: torch.Tensor, offsets, seq_len: int, slot_len: int, fill: float) -> torch.Tensor:
    """(M, D) -> (M, L, D) written position by position: the row's vector inside its slot, ``fill`` outside."""
    out = torch.full((vectors.shape[0], seq_len, vectors.shape[1]), fill)
    for i, off in enumerate(offsets.tolist()):
        out[i, off : off + slot_len] = vectors[i]
    return out


def block_inputs(cfg, seed: int):
    gen = torch.Generator().manual_seed(seed)
    m, seq_len, slot_len = 3, 24, 9
    x = torch.randn(m, seq_len, cfg.head_hidden_size, generator=gen)
    c = torch.randn(m, cfg.head_hidden_size, generator=gen)
    offsets = torch.tensor([0, 7, seq_len - slot_len])
    return x, c, offsets, seq_len, slot_len


def run_block(block, cfg, x, c, offsets, seq_len, slot_len, mask):
    inv_freq = llama3_inv_freq(cfg.head_dim_head, cfg.head_rope_theta)
    cos, sin = rope_cos_sin(torch.arange(seq_len), inv_freq, x.dtype)
    with torch.no_grad():
        return block(x, c, in_slot_mask(offsets, seq_len, slot_len), cos, sin, mask), inv_freq


@CONFIGS
def test_modulated_block_matches_reference(cfg):
    block = randomize_(ModulatedAttentionBlock(cfg), seed=0).eval()
    x, c, offsets, seq_len, slot_len = block_inputs(cfg, seed=1)
    mask = omni_mask(offsets, seq_len, slot_len)
    out, inv_freq = run_block(block, cfg, x, c, offsets, seq_len, slot_len, mask)
    with torch.no_grad():
        chunks = block.adaLN_modulation[1](torch.nn.functional.silu(c)).chunk(6, dim=-1)
        fills = (0.0, 0.0, 1.0, 0.0, 0.0, 1.0)  # shift, scale, gate (attention), shift, scale, gate (MLP)
        mods = [slot_modulation(v, offsets, seq_len, slot_len, f) for v, f in zip(chunks, fills, strict=True)]
        ref = reference_block(block, x, mods, inv_freq, mask, cfg.head_rms_norm_eps)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@CONFIGS
def test_modulation_only_inside_the_slot(cfg):
    """With a diagonal mask every position is independent: outside the slot the output is a plain block."""
    block = randomize_(ModulatedAttentionBlock(cfg), seed=2).eval()
    x, c, offsets, seq_len, slot_len = block_inputs(cfg, seed=3)
    diagonal = torch.eye(seq_len, dtype=torch.bool)[None, None]
    out, inv_freq = run_block(block, cfg, x, c, offsets, seq_len, slot_len, diagonal)
    d = cfg.head_hidden_size
    with torch.no_grad():
        zero, one = torch.zeros(x.shape[0], seq_len, d), torch.ones(x.shape[0], seq_len, d)
        plain = reference_block(block, x, (zero, zero, one, zero, zero, one), inv_freq, diagonal, cfg.head_rms_norm_eps)
    inside = in_slot_mask(offsets, seq_len, slot_len)[..., 0]
    torch.testing.assert_close(out[~inside], plain[~inside], rtol=1e-5, atol=1e-5)
    per_position = (out - plain).norm(dim=-1) / plain.norm(dim=-1)
    assert bool((per_position[inside] > 1e-2).all()), "adaLN had no effect inside the slot"


def test_block_norm_eps():
    block, final = ModulatedAttentionBlock(TINY), FinalLayer(TINY)
    assert block.input_layernorm.eps == block.post_attention_layernorm.eps == 1e-5
    assert block.self_attn.q_norm.eps == block.self_attn.k_norm.eps == 1e-6
    assert final.norm_final.eps == 1e-6


def test_in_slot_mask_marks_the_slot():
    mask = in_slot_mask(torch.tensor([0, 3, 6]), 10, 4)
    assert mask.shape == (3, 10, 1)
    expected = torch.zeros(3, 10, dtype=torch.bool)
    expected[0, 0:4], expected[1, 3:7], expected[2, 6:10] = True, True, True
    assert torch.equal(mask[..., 0], expected)


# ---- final layer ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "showo2-1.5b"])
def test_final_layer_shape_and_slot_modulation(name):
    cfg = get_config(name)
    d = cfg.head_hidden_size
    final = randomize_(FinalLayer(cfg), seed=4).eval()
    gen = torch.Generator().manual_seed(5)
    x, c = torch.randn(2, 12, d, generator=gen), torch.randn(2, d, generator=gen)
    offsets, slot_len = torch.tensor([1, 4]), 6
    with torch.no_grad():
        out = final(x, c, in_slot_mask(offsets, 12, slot_len))
        shift, scale = final.adaLN_modulation[1](torch.nn.functional.silu(c)).chunk(2, dim=-1)
        shift = slot_modulation(shift, offsets, 12, slot_len, 0.0)
        scale = slot_modulation(scale, offsets, 12, slot_len, 0.0)
        y = rms_norm(x, final.norm_final.weight, 1e-6) * (1 + scale) + shift
        ref = y @ final.linear.weight.T + final.linear.bias
    assert out.shape == (2, 12, 64) == (2, 12, cfg.patch_dim)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
