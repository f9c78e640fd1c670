"""flashu_fx.vae on the CPU: the pure helpers, and the codec around a tiny random AutoencoderKLWan saved locally."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
import torch

from flashu_fx.config import get_config
from flashu_fx.vae import (
    WAN_LATENT_MEAN,
    WAN_LATENT_STD,
    WanLatentCodec,
    denormalize_latents,
    load_wan_vae,
    normalize_latents,
    preprocess_image,
    to_uint8,
)

# Show-o2's published statistics, written out here so that a changed constant in the package fails the test.
SHOWO2_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]  # fmt: skip
SHOWO2_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]  # fmt: skip
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])


def channel(values: list[float]) -> torch.Tensor:
    return torch.tensor(values)[None, :, None, None]


# ---- pure helpers ---------------------------------------------------------------------------------------
def test_constants_are_show_o2s():
    assert list(WAN_LATENT_MEAN) == SHOWO2_MEAN and list(WAN_LATENT_STD) == SHOWO2_STD


def test_normalize_and_denormalize_are_inverse_and_use_the_constants():
    z = torch.randn(2, 16, 3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(normalize_latents(denormalize_latents(z)), z)
    assert torch.allclose(denormalize_latents(normalize_latents(z)), z)
    assert torch.allclose(denormalize_latents(z), z * channel(SHOWO2_STD) + channel(SHOWO2_MEAN))
    video = z[:, :, None]  # (B, C, T, h, w): the channel is dim 1 for 5-D latents too
    assert torch.allclose(normalize_latents(video)[:, :, 0], normalize_latents(z))
    with pytest.raises(ValueError, match=r"one value per channel.*\(2, 8, 3, 5\)"):
        normalize_latents(torch.zeros(2, 8, 3, 5))


def test_to_uint8_truncates_like_upstream():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]).reshape(1, 1, 1, 6).expand(1, 3, 1, 6)
    out = to_uint8(x)
    assert out.shape == (1, 1, 6, 3) and out.dtype == torch.uint8
    assert out[0, 0, :, 0].tolist() == [0, 0, 127, 191, 255, 255]  # 127.5 -> 127, 191.25 -> 191
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(3, 4, 4\)"):
        to_uint8(torch.zeros(3, 4, 4))


def write_png(path, width: int, height: int):
    """A random RGB PNG of width x height; returns the PIL image as read back."""
    pil = pytest.importorskip("PIL.Image")
    g = torch.Generator().manual_seed(width * 1000 + height)
    rgb = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=g)
    pil.fromarray(rgb.numpy()).save(path)
    return pil.open(path).convert("RGB")


@pytest.mark.parametrize(("width", "height", "resized", "box"), [
    (40, 24, (26, 16), (5, 0, 21, 16)),  # wide: the height becomes 16, the width int(16 * 40 / 24) = 26
    (24, 41, (16, 27), (0, 6, 16, 22)),  # tall: the crop's top is round(5.5) = 6
])  # fmt: skip
def test_preprocess_resizes_the_shorter_side_and_crops_the_centre(tmp_path, width, height, resized, box):
    pil = pytest.importorskip("PIL.Image")
    image = write_png(tmp_path / "in.png", width, height)
    x = preprocess_image(tmp_path / "in.png", 16)
    assert x.shape == (1, 3, 16, 16) and x.dtype == torch.float32
    expected = image.resize(resized, pil.Resampling.BICUBIC).crop(box)
    want = torch.from_numpy(np.array(expected)).float().permute(2, 0, 1)
    assert torch.allclose(x[0], want / 127.5 - 1, atol=1e-6)  # ToTensor then Normalize(0.5, 0.5)
    assert torch.equal(preprocess_image(image, 16), x)  # a PIL image gives the same as its file


def test_preprocess_rejects_bad_input(tmp_path):
    pytest.importorskip("PIL.Image")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        preprocess_image(tmp_path / "nope.png", 16)
    with pytest.raises(ValueError, match="size must be a positive int.*0"):
        preprocess_image(tmp_path / "nope.png", 0)
    with pytest.raises(TypeError, match="file path or a PIL.Image.Image, got Tensor"):
        preprocess_image(torch.zeros(3, 8, 8), 16)


# ---- loading --------------------------------------------------------------------------------------------
def test_missing_directory_and_missing_config_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"VAE directory .*absent does not exist"):
        load_wan_vae(tmp_path / "absent")
    (tmp_path / "pipe" / "vae").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"pipe has no config.json \(for a Wan pipeline directory, pass"):
        load_wan_vae(tmp_path / "pipe")
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype, got torch.int64"):
        load_wan_vae(tmp_path, dtype=torch.int64)


def test_without_diffusers_the_error_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    with pytest.raises(ImportError, match=r"diffusers>=0.33.*flashu-fx\[vae\]"):
        load_wan_vae(tmp_path)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny random AutoencoderKLWan (8x spatial, 16 channels, Show-o2's statistics) saved with save_pretrained."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wan-vae")
    diffusers.AutoencoderKLWan(**TINY_VAE).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def codec(vae_dir) -> WanLatentCodec:
    return WanLatentCodec.from_pretrained(vae_dir)


def test_loader_reads_the_saved_vae(vae_dir, codec):
    vae = load_wan_vae(vae_dir, dtype=torch.float64)
    assert next(vae.parameters()).dtype == torch.float64 and not vae.training
    assert not any(p.requires_grad for p in vae.parameters())
    saved = {k: v.double() for k, v in codec.vae.state_dict().items()}
    assert all(torch.equal(v, saved[k]) for k, v in vae.state_dict().items())
    assert codec.mean == tuple(SHOWO2_MEAN) and codec.std == tuple(SHOWO2_STD) and codec.scale == 8


def spy(monkeypatch, vae, name: str) -> list:
    """Records the first argument of every ``vae.<name>`` call (undone after the test)."""
    calls, original = [], getattr(vae, name)

    def wrapper(x, *args, **kwargs):
        calls.append(x.clone())
        return original(x, *args, **kwargs)

    monkeypatch.setattr(vae, name, wrapper)
    return calls


def test_decode_denormalises_with_the_constants_and_returns_uint8_images(codec, monkeypatch):
    latents = torch.randn(2, 16, 3, 4, generator=torch.Generator().manual_seed(1))
    calls = spy(monkeypatch, codec.vae, "decode")
    images = codec.decode_to_images(latents)
    assert images.shape == (2, 24, 32, 3) and images.dtype == torch.uint8
    (z,) = calls
    assert z.shape == (2, 16, 1, 3, 4)  # the frame axis
    assert torch.allclose(z[:, :, 0], latents * channel(SHOWO2_STD) + channel(SHOWO2_MEAN), atol=1e-6)
    pixels = codec.decode(latents)
    assert pixels.shape == (2, 3, 24, 32) and -1 <= pixels.min() and pixels.max() <= 1
    assert torch.equal(images, to_uint8(pixels))
    with pytest.raises(ValueError, match=r"latents must be \(B, 16, h, w\).*\(2, 16, 1, 3, 4\)"):
        codec.decode(z)


def test_encode_image_file_resizes_crops_encodes_and_normalises(codec, tmp_path, monkeypatch):
    cfg = get_config("tiny")  # latent grid 8 x 8: 64 x 64 pixels
    write_png(tmp_path / "photo.png", 96, 72)  # non-square: resized to 85 x 64, then the centre 64 x 64
    calls = spy(monkeypatch, codec.vae, "encode")
    latents = codec.encode_image_file(tmp_path / "photo.png", cfg)
    assert latents.shape == (1, cfg.latent_channels, *cfg.latent_size) == (1, 16, 8, 8)
    (x,) = calls
    assert torch.equal(x, preprocess_image(tmp_path / "photo.png", 64)[:, :, None])  # (1, 3, 1, 64, 64)
    mu = codec.vae.encode(x).latent_dist.mean[:, :, 0]
    assert torch.allclose(latents, (mu - channel(SHOWO2_MEAN)) / channel(SHOWO2_STD), atol=1e-6)
    # sample=True draws from the posterior: not the mean, and reproducible with a seeded generator
    draw = lambda: codec.encode_image_file(tmp_path / "photo.png", cfg, True, torch.Generator().manual_seed(3))
    first = draw()
    assert not torch.allclose(first, latents) and torch.equal(first, draw())
    assert codec.decode_to_images(latents).shape == (1, 64, 64, 3)


def test_encode_image_file_checks_the_config(codec, tmp_path):
    write_png(tmp_path / "photo.png", 16, 16)
    wide = dataclasses.replace(get_config("tiny"), image_grid=(4, 6))
    with pytest.raises(ValueError, match=r"square latent grid, got config.latent_size=\(8, 12\)"):
        codec.encode_image_file(tmp_path / "photo.png", wide)
    with pytest.raises(ValueError, match="multiples of 8"):
        codec.encode(torch.zeros(1, 3, 12, 16))


def test_other_statistics_raise_or_warn():
    diffusers = pytest.importorskip("diffusers")
    other = list(SHOWO2_MEAN)
    other[3] = 0.5
    vae = diffusers.AutoencoderKLWan(**TINY_VAE, latents_mean=other)
    with pytest.raises(ValueError, match=r"latents_mean\[3\] = 0.5 \(Show-o2: 0.1075\).*strict=False"):
        WanLatentCodec(vae)
    with pytest.warns(UserWarning, match=r"latents_mean\[3\].*the VAE's own statistics"):
        codec = WanLatentCodec(vae, strict=False)
    assert codec.mean[3] == 0.5
