"""The testbed codec is exact on images and an orthogonal map on the latent side."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashu_fx.testbed import codec


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), half_side=st.integers(1, 12))
def test_decode_inverts_encode_exactly(seed: int, batch: int, half_side: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 2 * half_side, 2 * half_side, 3), generator=gen, dtype=torch.uint8)
    latents = codec.encode(images)
    assert latents.shape == (batch, codec.LATENT_CHANNELS, half_side, half_side)
    assert torch.equal(codec.decode(latents), images)
    # A bf16 model's latents: rounding moves a pixel by a few of its 256 levels at most.
    assert (codec.decode(latents.bfloat16()).int() - images.int()).abs().max() <= 3


def test_hadamard_is_orthogonal_and_spreads_every_pixel() -> None:
    h = codec.hadamard(16)
    torch.testing.assert_close(h @ h.T, torch.eye(16), rtol=0, atol=1e-6)
    assert (h.abs() == 0.25).all()  # every latent channel mixes every data channel
    with pytest.raises(ValueError, match="power of two"):
        codec.hadamard(12)


def test_output_outside_the_image_subspace_is_dropped() -> None:
    """The model may put anything in the 4 directions no image uses; decoding projects it away."""
    images = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    z = codec.mix_pixels(images)
    unused = codec.hadamard(16)[:, codec.DATA_CHANNELS :]  # columns of the mix fed by the zero channels
    mean = torch.tensor(codec.LATENT_MEAN)[:, None, None]
    std = torch.tensor(codec.LATENT_STD)[:, None, None]
    z_noisy = z + torch.einsum("ok,bkhw->bohw", unused, torch.randn(2, 4, 4, 4))
    assert torch.equal(codec.decode((z_noisy - mean) / std), images)


def test_bad_shapes_name_the_argument() -> None:
    with pytest.raises(ValueError, match="images must be uint8"):
        codec.encode(torch.zeros(1, 8, 8, 3))
    with pytest.raises(ValueError, match="even"):
        codec.encode(torch.zeros(1, 7, 8, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="latents must be"):
        codec.decode(torch.zeros(1, 12, 4, 4))


def test_normalisation_gives_world_latents_unit_scale() -> None:
    """The shipped constants hold on renders they were not measured on (another seed of the world)."""
    import numpy as np

    from flashu_fx.testbed import world

    rng = world.rng_for("train", 7)
    images = np.concatenate([world.training_batch_gen(rng, 1500)[1], world.training_batch_und(rng, 1500)[1]])
    z = codec.encode(torch.from_numpy(images))
    assert z.mean(dim=(0, 2, 3)).abs().max() < 0.1
    torch.testing.assert_close(z.std(dim=(0, 2, 3)), torch.ones(16), rtol=0.1, atol=0)
