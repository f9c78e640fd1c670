"""Show-o2 model configuration: one frozen dataclass and the presets.

Sizes are read top-down as in the checkpoint: the Qwen2.5 LLM, the SigLIP-style understanding stack,
the 10-block diffusion head. ``showo2-1.5b`` and ``showo2-7b`` are the official shapes (docs/SHOWO2.md §1.1-1.6);
``tiny`` and ``tiny-tied`` are for tests and the CPU demo.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids with a role in the Show-o2 layouts (docs/SHOWO2.md §1.8)."""

    bos: int  # <|im_start|>
    eos: int  # <|im_end|>
    boi: int  # <|vision_start|>
    eoi: int  # <|vision_end|>
    img_pad: int  # <|image_pad|>
    pad: int  # [PAD]


QWEN_SPECIALS = SpecialTokens(bos=151644, eos=151645, boi=151652, eoi=151653, img_pad=151655, pad=151665)


@dataclass(frozen=True)
class Showo2Config:
    """Every size of a Show-o2 model. ``H`` = hidden_size, ``D`` = head_hidden_size."""

    name: str
    # LLM (Qwen2.5)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    # understanding stack (SigLIP so400m minus its last layer)
    und_hidden_size: int = 1152
    und_num_layers: int = 26
    und_num_heads: int = 16
    und_intermediate_size: int = 4304
    und_num_positions: int = 729  # rows of the SigLIP position table (27 x 27)
    # diffusion head
    head_hidden_size: int = 2048
    head_num_layers: int = 10
    head_num_heads: int = 32
    head_num_kv_heads: int = 8
    head_dim_head: int = 64
    head_intermediate_size: int = 8192
    head_rope_theta: float = 500_000.0
    head_rms_norm_eps: float = 1e-5
    frequency_embedding_size: int = 256
    # image layout
    latent_channels: int = 16
    patch_size: int = 2
    image_grid: tuple[int, int] = (27, 27)  # token grid of the checkpoint config (432 x 432)
    max_seq_len: int = 1024
    specials: SpecialTokens = QWEN_SPECIALS

    def __post_init__(self) -> None:
        # Every integer size (a zero would otherwise surface later as a ZeroDivisionError or an empty layer).
        for field in (f.name for f in dataclasses.fields(self) if f.type == "int"):
            if getattr(self, field) <= 0:
                raise ValueError(f"Showo2Config.{field} must be positive, got {getattr(self, field)}")
        if min(self.image_grid) <= 0:
            raise ValueError(f"Showo2Config.image_grid must be positive, got {self.image_grid}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_num_heads % self.head_num_kv_heads:
            raise ValueError(
                f"head_num_heads={self.head_num_heads} is not a multiple of head_num_kv_heads={self.head_num_kv_heads}"
            )
        if self.und_hidden_size % self.und_num_heads:
            raise ValueError(f"und_hidden_size={self.und_hidden_size} not divisible by und_num_heads")
        if self.hidden_size == self.head_hidden_size:
            # Upstream drops time_embed_proj / diff_proj in that case: a different key set we do not support.
            raise ValueError("hidden_size == head_hidden_size is not a Show-o2 layout (no diff_proj/time_embed_proj)")
        if self.max_text_len < 0:
            raise ValueError(
                f"Showo2Config.max_seq_len={self.max_seq_len} cannot hold the image slot ({self.image_slot_len}) "
                "plus bos, boi, eoi, eos"
            )
        side = math.isqrt(self.und_num_positions)
        if side * side != self.und_num_positions:
            raise ValueError(f"und_num_positions={self.und_num_positions} is not a square grid")

    # Derived sizes -------------------------------------------------------------------------------------
    @property
    def num_image_tokens(self) -> int:
        """Tokens of one image on the configured grid (729 at 432 x 432)."""
        return self.image_grid[0] * self.image_grid[1]

    @property
    def image_slot_len(self) -> int:
        """Positions of one image slot: the time-embedding token plus the image tokens (730)."""
        return self.num_image_tokens + 1

    @property
    def latent_size(self) -> tuple[int, int]:
        """VAE latent height and width (54 x 54 at 432)."""
        return self.image_grid[0] * self.patch_size, self.image_grid[1] * self.patch_size

    @property
    def max_text_len(self) -> int:
        """Prompt budget of the generation layout: L - (image slot) - bos, boi, eoi, eos (290 at 432)."""
        return self.max_seq_len - self.image_slot_len - 4

    @property
    def patch_dim(self) -> int:
        """Features of one output token: p * p * C = 64."""
        return self.patch_size * self.patch_size * self.latent_channels

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Showo2Config:
        data = dict(data)
        data["specials"] = SpecialTokens(**data["specials"])
        data["image_grid"] = tuple(data["image_grid"])
        return cls(**data)


_TINY_SPECIALS = SpecialTokens(bos=250, eos=251, boi=252, eoi=253, img_pad=254, pad=255)

PRESETS: dict[str, Showo2Config] = {
    "showo2-1.5b": Showo2Config(
        name="showo2-1.5b",
        vocab_size=151669,
        hidden_size=1536,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        head_dim=128,
        intermediate_size=8960,
        tie_word_embeddings=True,
    ),
    "showo2-7b": Showo2Config(
        name="showo2-7b",
        vocab_size=151669,
        hidden_size=3584,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        intermediate_size=18944,
        tie_word_embeddings=False,
    ),
    # Tiny presets keep every structural feature (GQA in both attentions, H != D, a 4x4 token grid).
    "tiny": Showo2Config(
        name="tiny",
        vocab_size=256,
        hidden_size=64,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=256,
        tie_word_embeddings=False,
        und_hidden_size=48,
        und_num_layers=2,
        und_num_heads=4,
        und_intermediate_size=96,
        und_num_positions=16,
        head_hidden_size=96,
        head_num_layers=2,
        head_num_heads=6,
        head_num_kv_heads=2,
        head_dim_head=16,
        head_intermediate_size=192,
        frequency_embedding_size=32,
        image_grid=(4, 4),
        max_seq_len=48,
        specials=_TINY_SPECIALS,
    ),
}
PRESETS["tiny-tied"] = dataclasses.replace(PRESETS["tiny"], name="tiny-tied", tie_word_embeddings=True)
# The trained testbed (flashu_fx/testbed): Show-o2's architecture at nano widths, deep enough (12 LLM layers) that
# skipping 20% of them is a real choice; 48 x 48 world images -> 24 x 24 latents -> a 12 x 12 token grid.
PRESETS["testbed-nano"] = Showo2Config(
    name="testbed-nano",
    vocab_size=128,
    hidden_size=256,
    num_layers=12,
    num_heads=8,
    num_kv_heads=2,
    head_dim=32,
    intermediate_size=512,
    tie_word_embeddings=False,
    rope_theta=10_000.0,
    und_hidden_size=128,
    und_num_layers=2,
    und_num_heads=4,
    und_intermediate_size=256,
    und_num_positions=144,
    head_hidden_size=192,
    head_num_layers=3,
    head_num_heads=6,
    head_num_kv_heads=2,
    head_dim_head=32,
    head_intermediate_size=384,
    head_rope_theta=10_000.0,
    frequency_embedding_size=128,
    image_grid=(12, 12),
    max_seq_len=192,
    specials=SpecialTokens(bos=120, eos=121, boi=122, eoi=123, img_pad=124, pad=125),
)


def get_config(name: str) -> Showo2Config:
    """The preset ``name``; raises with the list of presets when unknown."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown Show-o2 preset {name!r}; known presets: {sorted(PRESETS)}") from None
