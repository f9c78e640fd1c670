"""Show-o2 (Qwen2.5 variant): the top module, read top-down as its forward runs (docs/SHOWO2.md §1.10).

    tokens ─ embed_tokens ───────────────┐
    latents ─ und: patch+pos ─ SigLIP ─┐ │
            └ gen: patch ──────────── fusion_proj ─ image_embeds ┐
    t ─ time_embed ─ time_embed_proj ─────────────────────────── fill slot ─ LLM (omni mask) ─ norm
                  └──────────── adaLN ─ diff_proj ─ 10 modulated blocks ─ FinalLayer ─ unpatchify ─ v

Module attribute names are the checkpoint's, so ``state_dict()`` has exactly the official 910 keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flashu_fx.config import Showo2Config
from flashu_fx.diffusion_head import FinalLayer, ModulatedAttentionBlock, TimestepEmbedder, in_slot_mask
from flashu_fx.layers import RMSNorm, llama3_inv_freq, rope_cos_sin, rope_inv_freq
from flashu_fx.qwen2 import Qwen2ForCausalLM
from flashu_fx.siglip import SiglipEncoder
from flashu_fx.und_cache import UndCache


class PatchEmbed(nn.Module):
    """Conv2d(C -> E, kernel = stride = p): latents (N, C, h, w) -> tokens (N, h/p * w/p, E), row-major."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Showo2Output(NamedTuple):
    logits: Tensor | None  # (M, L, V), None when not asked for; an understanding call: (1, 1, V), the last row's
    velocity: Tensor | None  # (M, C, h, w); None for an understanding call


def unpatchify(tokens: Tensor, latent_hw: tuple[int, int], channels: int) -> Tensor:
    """Show-o2's output layout (docs/SHOWO2.md §1.7): a plain reshape, NO patch permutation.

    tokens: (N, n, p*p*C) -> (N, C, h, w). Feature f of token k is channel f % C of raster pixel 4k + f // C
    (for p = 2): the official weights predict in this layout.
    """
    n = tokens.shape[0]
    h, w = latent_hw
    return tokens.reshape(n, h * w, channels).transpose(1, 2).reshape(n, channels, h, w)


class Showo2(nn.Module):
    def __init__(self, config: Showo2Config) -> None:
        super().__init__()
        cfg = self.config = config
        h, d = cfg.hidden_size, cfg.head_hidden_size
        self.showo = Qwen2ForCausalLM(cfg)
        self.image_embedder_und = PatchEmbed(cfg.latent_channels, cfg.und_hidden_size, cfg.patch_size)
        self.image_embedder_gen = PatchEmbed(cfg.latent_channels, h, cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.und_num_positions, cfg.und_hidden_size)
        self.und_trans = SiglipEncoder(cfg)
        self.fusion_proj = nn.Sequential(
            RMSNorm(cfg.und_hidden_size + h, 1e-6), nn.Linear(cfg.und_hidden_size + h, h), nn.GELU(), nn.Linear(h, h)
        )
        self.time_embed = TimestepEmbedder(d, cfg.frequency_embedding_size)
        self.time_embed_proj = nn.Linear(d, h)
        self.diff_proj = nn.Sequential(nn.Linear(h, d), nn.GELU(), nn.Linear(d, d))
        self.diffusion_head_a = nn.ModuleList(ModulatedAttentionBlock(cfg) for _ in range(cfg.head_num_layers))
        self.diffusion_head_b = FinalLayer(cfg)
        self.register_buffer("llm_inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)
        self.register_buffer("head_inv_freq", torch.empty(cfg.head_dim_head // 2), persistent=False)
        if not self.llm_inv_freq.is_meta:  # on the meta device they are built at load time
            self.reset_rope_buffers()

    def reset_rope_buffers(self) -> None:
        """RoPE tables are recomputed, not loaded: LLM theta 1e6; head theta 5e5, llama3-scaled (fp32)."""
        device = "cpu" if self.llm_inv_freq.is_meta else self.llm_inv_freq.device
        with torch.device(device):
            self.llm_inv_freq = rope_inv_freq(self.config.head_dim, self.config.rope_theta)
            self.head_inv_freq = llama3_inv_freq(self.config.head_dim_head, self.config.head_rope_theta)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Showo2:
        """What ``to``, ``half``, ``cuda`` and ``to_empty`` run: the RoPE frequencies are rebuilt in fp32 on the new
        device, whatever dtype the weights take. A bf16 cast would round them, and every position's angle with them
        (upstream's Qwen2 keeps them fp32); ``to_empty`` would leave them uninitialised."""
        super()._apply(fn, recurse)
        if not self.llm_inv_freq.is_meta:
            self.reset_rope_buffers()
        return self

    # ---- image and time inputs ---------------------------------------------------------------------
    def und_position_embedding(self, grid: tuple[int, int]) -> Tensor:
        """(tokens, 1152): the SigLIP table, added directly when its size is the checkpoint config's grid,
        else bicubic-resized to ``grid`` (upstream's rule decides on the config grid, docs/SHOWO2.md §1.3)."""
        table = self.position_embedding.weight
        if table.shape[0] == self.config.num_image_tokens:
            if grid[0] * grid[1] != table.shape[0]:
                raise ValueError(
                    f"latent grid {grid} has {grid[0] * grid[1]} tokens but the position table has {table.shape[0]} "
                    f"rows for the configured grid {self.config.image_grid}; set image_grid to the input grid"
                )
            return table
        side = int(table.shape[0] ** 0.5)
        square = table.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        resized = F.interpolate(square, size=grid, mode="bicubic", align_corners=False)
        return resized.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(table.dtype)

    def image_embeds(self, latents: Tensor) -> Tensor:
        """latents (N, C, h, w) -> fused image embeddings (N, h/p * w/p, H)."""
        latents = latents.to(self.image_embedder_gen.proj.weight.dtype)
        grid = (latents.shape[-2] // self.config.patch_size, latents.shape[-1] // self.config.patch_size)
        und = self.image_embedder_und(latents) + self.und_position_embedding(grid)
        und = self.und_trans(und)
        gen = self.image_embedder_gen(latents)
        return self.fusion_proj(torch.cat([und, gen], dim=-1))

    def time_embeds(self, t: Tensor) -> Tensor:
        """t (N,) -> adaLN conditioning (N, D)."""
        return self.time_embed(t)

    def embed_inputs(self, tokens: Tensor, offsets: Tensor, image_embeds: Tensor, time_embeds: Tensor) -> Tensor:
        """Token embeddings with each row's slot filled: [time_embed_proj(t) | image_embeds[:slot-1]].

        tokens: (M, L); offsets: (M,) slot start; image_embeds: (M, n, H); time_embeds: (M, D) -> (M, L, H)
        """
        x = self.showo.model.embed_tokens(tokens)
        slot = torch.cat([self.time_embed_proj(time_embeds)[:, None].to(x.dtype), image_embeds.to(x.dtype)], dim=1)
        idx = offsets[:, None] + torch.arange(slot.shape[1], device=tokens.device)[None]
        return x.scatter(1, idx[..., None].expand(-1, -1, x.shape[-1]), slot)

    def embed_prompt(self, tokens: Tensor, offsets: Tensor, latents: Tensor) -> Tensor:
        """An understanding prompt's embeddings, its slot holding the CLEAN image (t = 1, the time token included).

        tokens: (M, L) int; offsets: (M,) slot starts (time token); latents: (M, C, h, w) -> (M, L, H)
        """
        c = self.time_embeds(torch.ones(tokens.shape[0], device=latents.device))
        return self.embed_inputs(tokens, offsets, self.image_embeds(latents), c)

    # ---- trunk and head ----------------------------------------------------------------------------
    def rope(self, seq_len: int, dtype: torch.dtype, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """cos/sin (L, d) for the LLM and for the head, positions 0..L-1."""
        pos = torch.arange(seq_len, device=device)
        return (*rope_cos_sin(pos, self.llm_inv_freq, dtype), *rope_cos_sin(pos, self.head_inv_freq, dtype))

    def head_blocks(self, hidden: Tensor, c: Tensor, in_slot: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        """LLM post-norm hidden (M, L, H) -> diff_proj -> 10 modulated blocks -> (M, L, D)."""
        x = self.diff_proj(hidden)
        for block in self.diffusion_head_a:
            x = block(x, c, in_slot, cos, sin, mask)
        return x

    def extract_velocity(self, v_tokens: Tensor, offsets: Tensor, latent_hw: tuple[int, int]) -> Tensor:
        """(M, L, p*p*C) -> the slot's image tokens (time token dropped) -> (M, C, h, w)."""
        n = latent_hw[0] * latent_hw[1] // self.config.patch_size**2
        idx = offsets[:, None] + 1 + torch.arange(n, device=v_tokens.device)[None]
        image = v_tokens.gather(1, idx[..., None].expand(-1, -1, v_tokens.shape[-1]))
        return unpatchify(image, latent_hw, self.config.latent_channels)

    def forward(
        self,
        tokens: Tensor,
        latents: Tensor | None,
        t: Tensor | None,
        offsets: Tensor | None,
        mask: Tensor | None,
        return_logits: bool = True,
        cache: UndCache | None = None,
    ) -> Showo2Output:
        """One generation call, computing what upstream computes (all L positions, lm_head included).

        tokens: (M, L) int; latents: (M, C, h, w); t: (M,); offsets: (M,) slot starts (time token);
        mask: bool (M, 1, L, L) omni mask -> logits (M, L, V) | None, velocity (M, C, h, w) in the model dtype.

        With ``cache`` (an ``UndCache``): one understanding call, ``understand``'s arguments.
        """
        if cache is not None:
            if t is not None or not return_logits:
                raise ValueError("an understanding call (cache given) takes t=None and return_logits=True: the image "
                                 f"is clean (t = 1) and logits are its output; got t={t!r}, "
                                 f"return_logits={return_logits!r}")
            return self.understand(tokens, latents, offsets, mask, cache)
        check_gen_inputs(self.config, tokens, latents, t, offsets, mask)
        seq_len = tokens.shape[1]
        image = self.image_embeds(latents)
        c = self.time_embeds(t)
        x = self.embed_inputs(tokens, offsets, image, c)
        cos, sin, head_cos, head_sin = self.rope(seq_len, x.dtype, x.device)
        hidden = self.showo(x, cos, sin, mask)
        logits = self.showo.lm_head(hidden) if return_logits else None
        in_slot = in_slot_mask(offsets, seq_len, image.shape[1] + 1)
        v_tokens = self.diffusion_head_b(self.head_blocks(hidden, c, in_slot, head_cos, head_sin, mask), c, in_slot)
        return Showo2Output(logits, self.extract_velocity(v_tokens, offsets, tuple(latents.shape[-2:])))

    def understand(self, tokens: Tensor, latents: Tensor | None, offsets: Tensor | None, mask: Tensor | None,
                   cache: UndCache) -> Showo2Output:
        """One understanding call through ``cache``: the prefill of a prompt or one decode step (gpt-fast's pair).

        Prefill: tokens (1, L0) with the image slot at ``offsets`` (1,), latents (1, C, h, w) of the clean image
        (t = 1), mask bool (1, 1, L0, L0) the prompt's omni mask. Decode step: tokens (1, n) appended after
        everything the cache holds, latents, offsets and mask None (causal). Each layer appends its rows to its
        ``LayerCache``; RoPE positions continue from ``cache.position``. -> logits (1, 1, V) of the last row,
        velocity None. Run it with ``torch.compile(model, backend=flashu_backend("und"))`` to compile both shapes.
        """
        check_und_inputs(self.config, tokens, latents, offsets, mask, cache)
        n = tokens.shape[1]
        if latents is None:
            x = self.showo.model.embed_tokens(tokens)
            # one new token needs no mask among the new rows (its cache sees it); several are causal
            mask = None if n == 1 else torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril()[None, None]
        else:
            x = self.embed_prompt(tokens, offsets, latents)
        positions = cache.advance(n)
        hidden = self.showo(x, cache.cos[positions], cache.sin[positions], mask, cache.layers)
        # One row as a vector (a GEMV, as the eager decoders compute it: the same logits bit for bit).
        return Showo2Output(self.showo.lm_head(hidden[0, -1])[None, None], None)


def check_und_inputs(cfg: Showo2Config, tokens: Tensor, latents: Tensor | None, offsets: Tensor | None,
                     mask: Tensor | None, cache: UndCache) -> None:
    """Shapes of an understanding call; raises naming the argument (Dynamo would bury a shape error)."""
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise ValueError(f"tokens must be (1, n) for an understanding call, got {tuple(tokens.shape)}")
    n = tokens.shape[1]
    if latents is None:
        if offsets is not None or mask is not None:
            raise ValueError("a decode step (latents=None) takes offsets=None and mask=None")
    else:
        if offsets is None or tuple(offsets.shape) != (1,):
            raise ValueError(f"offsets must be (1,) (the time token's position) for a prefill, got "
                             f"{None if offsets is None else tuple(offsets.shape)}")
        if mask is None or tuple(mask.shape) != (1, 1, n, n) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool (1, 1, {n}, {n}) for a prefill of {n} tokens, got "
                             f"{None if mask is None else (tuple(mask.shape), mask.dtype)}")
    if len(cache.layers) != cfg.num_layers:
        raise ValueError(f"cache has {len(cache.layers)} layers, the model {cfg.num_layers}")


def check_gen_inputs(cfg: Showo2Config, tokens: Tensor, latents: Tensor, t: Tensor, offsets: Tensor,
                     mask: Tensor) -> None:
    """The shapes ``Showo2.forward`` documents; raises naming the argument, its shape and the expected one
    (shape checks only: under torch.compile they cost no graph node)."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (M, L) token ids, got shape {tuple(tokens.shape)}")
    rows, seq_len = tokens.shape
    expected = {
        "latents": (rows, cfg.latent_channels, *cfg.latent_size),
        "t": (rows,),
        "offsets": (rows,),
        "mask": (rows, 1, seq_len, seq_len),
    }
    for name, value in (("latents", latents), ("t", t), ("offsets", offsets), ("mask", mask)):
        if tuple(value.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]} for {rows} rows of {seq_len} tokens "
                             f"(latent channels {cfg.latent_channels}, latent size {cfg.latent_size}), "
                             f"got {tuple(value.shape)}")


@torch.no_grad()
def init_random_weights(model: Showo2, seed: int = 0, std: float = 0.02) -> Showo2:
    """Non-degenerate random weights for tests and benchmarks.

    Upstream zero-initialises adaLN and the final layer for training, which makes every velocity zero; here
    every weight is random (norm scales near 1), so all paths carry signal.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name or "layer_norm" in name or "norm_final" in name:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        elif name.startswith("fusion_proj.0"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        elif name.endswith("bias") and "norm" in name:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(std * torch.randn(p.shape, generator=gen))
    return model
