"""Pixels <-> Show-o2 latents through the Wan2.1 VAE (diffusers' ``AutoencoderKLWan``, a local directory).

    decode: latents (B, 16, h, w) ─ frame axis ─ z * std + mean ─ VAE decoder ─ (B, 3, 1, 8h, 8w) ─ clamp [-1, 1]
            ─ drop frame axis ─ to_uint8 ─ uint8 (B, 8h, 8w, 3)
    encode: image file ─ shorter side to S (bicubic) ─ centre crop S x S ─ [-1, 1] ─ (1, 3, 1, S, S) ─ VAE encoder
            ─ posterior mean (or a sample) ─ (z - mean) / std ─ (1, 16, S/8, S/8)

S = the model's latent size times the VAE's factor 8 (432 for the official checkpoints). ``mean`` and ``std`` are
Show-o2's per-channel statistics; the VAE's config carries them (``latents_mean`` / ``latents_std``) and the
codec checks that they agree. The VAE weights stay fp32 and run under bf16 autocast on CUDA, as upstream's
``WanVAE`` wrapper does. diffusers and Pillow (the ``[vae]`` extra) are imported only when used.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from flashu_fx.config import Showo2Config

if TYPE_CHECKING:
    from PIL.Image import Image

# Show-o2's (and diffusers' default) Wan2.1 per-channel latent statistics.
WAN_LATENT_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN_LATENT_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
STATS_TOLERANCE = 1e-4  # the constants are published to 4 decimals
_EXTRA_HINT = "install the [vae] extra: pip install 'flashu-fx[vae]'"


# ---- pure helpers --------------------------------------------------------------------------------------
def _channel_view(stats: Sequence[float] | Tensor, z: Tensor, name: str) -> Tensor:
    """``stats`` (C,) as a tensor broadcasting over dim 1 of ``z`` (B, C, ...), in z's dtype and device."""
    s = torch.as_tensor(stats, dtype=z.dtype, device=z.device)
    if z.dim() < 2 or s.shape != (z.shape[1],):
        raise ValueError(f"{name} must hold one value per channel of latents (B, C, ...): got {tuple(s.shape)} "
                         f"values for latents of shape {tuple(z.shape)}")
    return s.reshape(-1, *([1] * (z.dim() - 2)))


def normalize_latents(
    z: Tensor, mean: Sequence[float] | Tensor = WAN_LATENT_MEAN, std: Sequence[float] | Tensor = WAN_LATENT_STD
) -> Tensor:
    """VAE latents (B, C, ...) -> Show-o2's normalised latents (z - mean_c) / std_c, channel c on dim 1."""
    return (z - _channel_view(mean, z, "mean")) / _channel_view(std, z, "std")


def denormalize_latents(
    z: Tensor, mean: Sequence[float] | Tensor = WAN_LATENT_MEAN, std: Sequence[float] | Tensor = WAN_LATENT_STD
) -> Tensor:
    """Show-o2's normalised latents (B, C, ...) -> VAE latents z * std_c + mean_c (the inverse of normalize)."""
    return z * _channel_view(std, z, "std") + _channel_view(mean, z, "mean")


def to_uint8(pixels: Tensor) -> Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3) on the CPU: clamp((x + 1) / 2, 0, 1) * 255, truncated
    as upstream's ``astype(np.uint8)``."""
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(f"to_uint8 needs pixels of shape (B, 3, H, W), got {tuple(pixels.shape)}")
    x = ((pixels.float() + 1) / 2).clamp(0, 1) * 255
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().contiguous()


def _import_pil():
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError(f"reading images needs Pillow; {_EXTRA_HINT}") from err
    return Image


def preprocess_image(image: str | Path | Image, size: int) -> Tensor:
    """An image (a file path or a PIL image) -> float32 (1, 3, size, size) in [-1, 1], as upstream's
    ``image_transform``: the shorter side resized to ``size`` (bicubic, PIL), a centre crop, mean 0.5 / std 0.5.

    Resize and crop follow torchvision's ``Resize(size)`` and ``CenterCrop(size)`` on PIL images exactly.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int (pixels of the square crop), got {size!r}")
    pil = _import_pil()
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file {path} does not exist")
        with pil.open(path) as f:
            image = f.convert("RGB")
    elif isinstance(image, pil.Image):
        image = image.convert("RGB")
    else:
        raise TypeError(f"image must be a file path or a PIL.Image.Image, got {type(image).__name__}")
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)  # torchvision truncates the longer side
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    image = image.resize((new_w, new_h), pil.Resampling.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
    x = x.permute(2, 0, 1).float() / 255
    return ((x - 0.5) / 0.5)[None]


# ---- loading -------------------------------------------------------------------------------------------
def diffusers_available() -> bool:
    """Whether diffusers with ``AutoencoderKLWan`` (0.33 or newer) can be imported."""
    try:
        from diffusers import AutoencoderKLWan  # noqa: F401
    except ImportError:
        return False
    return True


def load_wan_vae(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A local diffusers-format Wan2.1 VAE directory (``config.json`` + weights) -> ``AutoencoderKLWan`` in eval
    mode with gradients off. Nothing is downloaded (``local_files_only=True``)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"VAE directory {path} does not exist (a local diffusers-format AutoencoderKLWan "
                                "directory; nothing is downloaded)")
    if not (path / "config.json").is_file():
        hint = " (for a Wan pipeline directory, pass its vae/ subfolder)" if (path / "vae").is_dir() else ""
        raise FileNotFoundError(f"VAE directory {path} has no config.json{hint}")
    try:
        from diffusers import AutoencoderKLWan
    except ImportError as err:
        raise ImportError(f"load_wan_vae needs diffusers>=0.33 (AutoencoderKLWan); {_EXTRA_HINT}") from err
    vae = AutoencoderKLWan.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


def _vae_stats(vae, strict: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from the VAE's config, checked against Show-o2's constants (raise, or warn when not strict)."""
    config = vae.config
    mean = tuple(float(v) for v in getattr(config, "latents_mean", None) or WAN_LATENT_MEAN)
    std = tuple(float(v) for v in getattr(config, "latents_std", None) or WAN_LATENT_STD)
    z_dim = getattr(config, "z_dim", len(mean))
    if len(mean) != z_dim or len(std) != z_dim:
        raise ValueError(f"the VAE's config has z_dim={z_dim} but {len(mean)} latents_mean and {len(std)} "
                         "latents_std values")
    if z_dim != len(WAN_LATENT_MEAN):
        diffs = [f"z_dim = {z_dim} (Show-o2: {len(WAN_LATENT_MEAN)})"]
    else:
        diffs = [
            f"{name}[{c}] = {got} (Show-o2: {want})"
            for name, vals, ref in (("latents_mean", mean, WAN_LATENT_MEAN), ("latents_std", std, WAN_LATENT_STD))
            for c, (got, want) in enumerate(zip(vals, ref, strict=True))
            if not math.isclose(got, want, abs_tol=STATS_TOLERANCE)
        ]
    if diffs:
        more = f" and {len(diffs) - 4} more" if len(diffs) > 4 else ""
        message = f"the VAE's latent statistics are not Show-o2's Wan2.1 ones: {'; '.join(diffs[:4])}{more}"
        if strict:
            raise ValueError(f"{message}; is this the Wan2.1 VAE? (strict=False uses the VAE's own statistics)")
        warnings.warn(f"{message}; using the VAE's own statistics", stacklevel=3)
    return mean, std


# ---- the codec -----------------------------------------------------------------------------------------
class WanLatentCodec:
    """Show-o2's normalised latents <-> pixels through a loaded ``AutoencoderKLWan``.

    ``strict``: the VAE config's ``latents_mean`` / ``latents_std`` must equal Show-o2's constants (within 1e-4),
    else ValueError; with ``strict=False`` a warning, and the VAE's own statistics are used.
    ``autocast_dtype``: on CUDA the VAE runs under this autocast (upstream: bf16 over fp32 weights); None runs in
    the weights' dtype. The CPU never autocasts.
    """

    def __init__(self, vae: Any, strict: bool = True, autocast_dtype: torch.dtype | None = torch.bfloat16) -> None:
        self.vae = vae
        self.mean, self.std = _vae_stats(vae, strict)
        self.autocast_dtype = autocast_dtype
        self.scale = int(getattr(vae.config, "scale_factor_spatial", None) or 8)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        strict: bool = True,
        autocast_dtype: torch.dtype | None = torch.bfloat16,
    ) -> WanLatentCodec:
        """``load_wan_vae(path, dtype, device)`` wrapped in a codec."""
        return cls(load_wan_vae(path, dtype, device), strict=strict, autocast_dtype=autocast_dtype)

    @property
    def channels(self) -> int:
        return len(self.mean)

    def _param(self) -> Tensor:
        return next(self.vae.parameters())

    def _autocast(self, device: torch.device):
        if device.type != "cuda" or self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents (B, C, h, w) -> float32 pixels (B, 3, scale * h, scale * w) in [-1, 1], on the
        VAE's device."""
        if latents.dim() != 4 or latents.shape[1] != self.channels:
            raise ValueError(f"latents must be (B, {self.channels}, h, w) normalised VAE latents, "
                             f"got {tuple(latents.shape)}")
        param = self._param()
        z = denormalize_latents(latents.to(param.device, torch.float32), self.mean, self.std)
        z = z.to(param.dtype)[:, :, None]  # (B, C, 1, h, w): an image is a one-frame video
        with self._autocast(z.device):
            video = self.vae.decode(z).sample  # (B, 3, 1, H, W)
        return video[:, :, 0].float().clamp(-1, 1)

    def decode_to_images(self, latents: Tensor) -> Tensor:
        """Normalised latents (B, C, h, w) -> uint8 (B, scale * h, scale * w, 3) on the CPU."""
        return to_uint8(self.decode(latents))

    @torch.no_grad()
    def encode(self, pixels: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> normalised latents float32 (B, C, H / scale, W / scale).

        ``sample=False`` takes the posterior's mean (deterministic); ``sample=True`` draws from it as upstream's
        understanding demo does (``generator`` seeds the draw).
        """
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be (B, 3, H, W) in [-1, 1], got {tuple(pixels.shape)}")
        if pixels.shape[2] % self.scale or pixels.shape[3] % self.scale:
            raise ValueError(f"pixels height and width must be multiples of {self.scale}, got {tuple(pixels.shape)}")
        param = self._param()
        x = pixels.to(param.device, param.dtype)[:, :, None]  # (B, 3, 1, H, W)
        with self._autocast(x.device):
            posterior = self.vae.encode(x).latent_dist
            z = posterior.sample(generator=generator) if sample else posterior.mean  # (B, C, 1, h, w)
        return normalize_latents(z[:, :, 0].float(), self.mean, self.std)

    def image_size(self, config: Showo2Config) -> int:
        """Pixels per side of the model's images: latent size times the VAE's factor (432 for Show-o2)."""
        h, w = config.latent_size
        if h != w:
            raise ValueError(f"encode_image_file needs a square latent grid, got config.latent_size={(h, w)}")
        if config.latent_channels != self.channels:
            raise ValueError(f"config.latent_channels={config.latent_channels} but the VAE has {self.channels} "
                             "latent channels")
        return h * self.scale

    def encode_image_file(
        self,
        image: str | Path | Image,
        config: Showo2Config,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """An image file (or PIL image) -> the model's understanding input: normalised latents float32
        (1, C, h, w) with (h, w) = ``config.latent_size``, on the VAE's device (see ``preprocess_image``,
        ``encode``)."""
        return self.encode(preprocess_image(image, self.image_size(config)), sample=sample, generator=generator)
