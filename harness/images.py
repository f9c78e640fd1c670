"""Latents to something a person can look at: a dependency-free PNG writer, a latent preview, Wan2.1 VAE decoding.

    latents (B, 16, h, w) ─┬─ a WanLatentCodec given: flashu_fx.vae (de-normalise, Wan2.1 decoder) ─ uint8
                           └─ otherwise: fixed 16 -> 3 projection ─ per-image contrast stretch ─ 8x nearest ─ uint8
    images (B, H, W, 3) uint8 ─ image_grid ─ write_png

Nothing here touches the network: the VAE loads from a local directory (``flashu_fx.vae.load_wan_vae``).

>>> import torch
>>> rgb = latent_preview(torch.randn(2, 16, 6, 6))
>>> rgb.shape, rgb.dtype
(torch.Size([2, 48, 48, 3]), torch.uint8)
>>> encode_png(image_grid(rgb))[:8] == PNG_SIGNATURE
True
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import torch
from torch import Tensor

from flashu_fx.vae import WanLatentCodec

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

VAE_SCALE = 8  # spatial down-sampling of the Wan2.1 VAE: a 54 x 54 latent is a 432 x 432 image


# ---- PNG ---------------------------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(rgb: Tensor) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes: 8-bit truecolour, no interlace, filter 0 on every row."""
    if rgb.dim() != 3 or rgb.shape[-1] != 3 or rgb.dtype != torch.uint8:
        raise ValueError(f"encode_png needs a uint8 (H, W, 3) tensor, got {rgb.dtype} {tuple(rgb.shape)}")
    h, w, _ = rgb.shape
    rows = torch.cat([torch.zeros(h, 1, dtype=torch.uint8), rgb.detach().cpu().reshape(h, w * 3)], dim=1)
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # width, height, bit depth 8, colour type 2 (RGB)
    raw = rows.contiguous().numpy().tobytes()
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b"")


def write_png(path: str | Path, rgb: Tensor) -> Path:
    """Write a uint8 (H, W, 3) image; parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(rgb))
    return path


# ---- latent preview ----------------------------------------------------------------------------------
def latent_projection(channels: int = 16) -> Tensor:
    """The fixed (3, C) preview projection: channel c is a hue on a colour wheel.

    P[k, c] = cos(2 pi c / C - 2 pi k / 3) for k = R, G, B. It is no learned decoder: it only makes the
    structure of the latents visible (shapes and regions, not true colours).
    """
    angle = 2 * math.pi * torch.arange(channels, dtype=torch.float32) / channels
    phase = 2 * math.pi * torch.arange(3, dtype=torch.float32) / 3
    return torch.cos(angle[None, :] - phase[:, None])


def latent_preview(latents: Tensor, scale: int = VAE_SCALE) -> Tensor:
    """latents (B, C, h, w) -> uint8 (B, h * scale, w * scale, 3).

    Projection as in ``latent_projection``; then each image's R, G, B planes are stretched on their own so
    that their 1st and 99th percentiles map to 0 and 255; nearest up-sampling by ``scale`` (the VAE's factor,
    so the preview has the decoded image's size).
    """
    if latents.dim() != 4:
        raise ValueError(f"latent_preview needs (B, C, h, w) latents, got {tuple(latents.shape)}")
    x = torch.einsum("kc,bchw->bkhw", latent_projection(latents.shape[1]), latents.detach().float().cpu())
    flat = x.flatten(2)  # (B, 3, h * w)
    lo = flat.quantile(0.01, dim=-1)[..., None, None]
    hi = flat.quantile(0.99, dim=-1)[..., None, None]
    x = ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def image_grid(images: Tensor, gap: int = 4, fill: int = 255) -> Tensor:
    """uint8 (B, H, W, 3) -> (H, B * W + (B - 1) * gap, 3): the images side by side, ``fill``-coloured gaps."""
    b, h, _, _ = images.shape
    parts = []
    for i in range(b):
        if i:
            parts.append(torch.full((h, gap, 3), fill, dtype=torch.uint8))
        parts.append(images[i].cpu())
    return torch.cat(parts, dim=1)


# ---- Wan2.1 VAE --------------------------------------------------------------------------------------
def latents_to_images(latents: Tensor, codec: WanLatentCodec | None = None) -> Tensor:
    """uint8 (B, H, W, 3): decoded by ``codec`` (``flashu_fx.vae``) when given, else the latent preview."""
    return latent_preview(latents) if codec is None else codec.decode_to_images(latents)
