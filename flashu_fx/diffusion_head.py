"""The flow head: time embedding, 10 modulated attention blocks (``diffusion_head_a``), FinalLayer.

Modulation (adaLN) applies only inside each row's image slot (time token + image tokens); elsewhere
shift = scale = 0 and gate = 1, so text, special and pad positions pass through plain blocks
(docs/SHOWO2.md §1.6).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flashu_fx.config import Showo2Config
from flashu_fx.layers import RMSNorm, apply_rope, attention
from flashu_fx.qwen2 import Qwen2MLP


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x * (1 + scale) + shift in fp32, cast back to x's dtype."""
    return (x.float() * (1 + scale.float()) + shift.float()).to(x.dtype)


def spread_to_slot(vectors: Tensor, in_slot: Tensor, fill: float) -> Tensor:
    """Per-row vectors (M, D) to per-position (M, L, D): the vector inside the slot, ``fill`` elsewhere.

    in_slot: bool (M, L, 1).
    """
    return torch.where(in_slot, vectors[:, None, :], torch.full_like(vectors[:, None, :], fill))


class TimestepEmbedder(nn.Module):
    """t in [0, 1] (raw flow time, no x1000) -> (N, D): sinusoid [cos | sin] in fp32, then an MLP."""

    def __init__(self, hidden: int, frequency_embedding_size: int) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def sinusoid(self, t: Tensor) -> Tensor:
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.sinusoid(t).to(self.mlp[0].weight.dtype))


class HeadAttention(nn.Module):
    """GQA attention with per-head qk RMSNorm before RoPE, no biases."""

    def __init__(self, cfg: Showo2Config) -> None:
        super().__init__()
        d, self.num_heads, self.num_kv_heads = cfg.head_hidden_size, cfg.head_num_heads, cfg.head_num_kv_heads
        self.head_dim = cfg.head_dim_head
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)
        self.q_norm = RMSNorm(self.head_dim, 1e-6)
        self.k_norm = RMSNorm(self.head_dim, 1e-6)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (M, L, D) -> q (M, heads, L, d), k and v (M, kv_heads, L, d): qk-norm, then RoPE."""
        b, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, n, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, prefix_kv: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        q, k, v = self.qkv(x, cos, sin)
        if prefix_kv is not None:  # K/V of earlier positions, computed once (keys first)
            k, v = torch.cat([prefix_kv[0], k], dim=2), torch.cat([prefix_kv[1], v], dim=2)
        return self.o_proj(attention(q, k, v, mask))


class ModulatedAttentionBlock(nn.Module):
    def __init__(self, cfg: Showo2Config) -> None:
        super().__init__()
        d = cfg.head_hidden_size
        self.self_attn = HeadAttention(cfg)
        self.mlp = Qwen2MLP(d, cfg.head_intermediate_size)
        self.input_layernorm = RMSNorm(d, cfg.head_rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(d, cfg.head_rms_norm_eps)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(
        self,
        x: Tensor,
        c: Tensor,
        in_slot: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        prefix_kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """x: (M, L, D); c: time embeddings (M, D); in_slot: bool (M, L, 1) -> (M, L, D)."""
        chunks = self.adaLN_modulation(c).chunk(6, dim=-1)
        shift_msa, scale_msa, shift_mlp, scale_mlp = (spread_to_slot(chunks[i], in_slot, 0.0) for i in (0, 1, 3, 4))
        gate_msa, gate_mlp = (spread_to_slot(chunks[i], in_slot, 1.0) for i in (2, 5))
        h = x + gate_msa * self.self_attn(
            modulate(self.input_layernorm(x), shift_msa, scale_msa), cos, sin, mask, prefix_kv
        )
        return h + gate_mlp * self.mlp(modulate(self.post_attention_layernorm(h), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """``diffusion_head_b``: modulated RMSNorm then Linear(D -> p*p*C); no gate."""

    def __init__(self, cfg: Showo2Config) -> None:
        super().__init__()
        d = cfg.head_hidden_size
        self.norm_final = RMSNorm(d, 1e-6)
        self.linear = nn.Linear(d, cfg.patch_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x: Tensor, c: Tensor, in_slot: Tensor) -> Tensor:
        """x: (M, L, D); c: (M, D) -> (M, L, p*p*C)."""
        shift, scale = (spread_to_slot(v, in_slot, 0.0) for v in self.adaLN_modulation(c).chunk(2, dim=-1))
        return self.linear(modulate(self.norm_final(x), shift, scale))


def in_slot_mask(offsets: Tensor, seq_len: int, slot_len: int) -> Tensor:
    """bool (M, L, 1): True at positions [offset, offset + slot_len) of each row."""
    pos = torch.arange(seq_len, device=offsets.device)[None, :]
    return ((pos >= offsets[:, None]) & (pos < offsets[:, None] + slot_len))[..., None]
