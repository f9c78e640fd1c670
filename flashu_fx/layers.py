"""Leaf layers shared by the LLM, the understanding stack and the diffusion head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF-Llama/Qwen2 RMSNorm: normalise in fp32, cast back, then scale (the order matters in bf16)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class RMSNorm(nn.Module):
    """``rms_norm`` with its scale as a parameter."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class FP32LayerNorm(nn.LayerNorm):
    """SigLIP's LayerNorm as Show-o2 runs it: input and affine weights upcast to fp32, result cast back."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(
            x.dtype
        )


def rope_inv_freq(head_dim: int, theta: float) -> Tensor:
    """Plain RoPE inverse frequencies theta^(-2j/d), j < d/2, fp32: (head_dim // 2,)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)).float()


def llama3_inv_freq(
    head_dim: int,
    theta: float,
    factor: float = 32.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_positions: int = 8192,
) -> Tensor:
    """Llama-3 scaled inverse frequencies, as the diffusion head uses them (docs/SHOWO2.md §1.6)."""
    base = rope_inv_freq(head_dim, theta).double()
    wavelen = 2 * math.pi / base
    low_wavelen = original_max_positions / low_freq_factor
    high_wavelen = original_max_positions / high_freq_factor
    smooth = (original_max_positions / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = (1 - smooth) * base / factor + smooth * base
    out = torch.where(wavelen < high_wavelen, base, torch.where(wavelen > low_wavelen, base / factor, mid))
    return out.float()


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables for rotate-half RoPE, computed in fp32 and cast to ``dtype``.

    positions: (..., L) int -> cos, sin: (..., L, head_dim)
    """
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE. x: (B, heads, L, d); cos/sin: (B, L, d) or (L, d)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """SDPA with grouped K/V. q: (B, Hq, Lq, d); k, v: (B, Hkv, Lk, d); mask: bool (B|1, 1, Lq, Lk), True = attend.

    Returns (B, Lq, Hq * d). ``mask=None`` means bidirectional (SigLIP).
    """
    if k.dtype != v.dtype:  # upstream casts q and k to v's dtype before the kernel
        q, k = q.to(v.dtype), k.to(v.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    b, h, lq, d = out.shape
    return out.transpose(1, 2).reshape(b, lq, h * d)
