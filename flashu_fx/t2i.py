"""Eager text-to-image: prompts -> cond/null batch -> noise -> Euler on the shifted grid with CFG -> latents.

>>> from flashu_fx import Showo2, get_config, init_random_weights, generate_images
>>> model = init_random_weights(Showo2(get_config("tiny"))).eval()
>>> generate_images(model, ["a red cube"], steps=3, guidance=5.0).shape
torch.Size([1, 16, 8, 8])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flashu_fx.inputs import check_baseline_steps, check_guidance, prompt_ids
from flashu_fx.layout import GenBatch, build_gen_batch
from flashu_fx.model import Showo2
from flashu_fx.sampler import VelocityFn, euler_sample, initial_noise, time_grid
from flashu_fx.tokenizer import TextTokenizer


def eager_velocity(model: Showo2, batch: GenBatch, return_logits: bool = True) -> VelocityFn:
    """One full upstream model call per step (all L positions, lm_head included when ``return_logits``)."""

    def velocity(x: Tensor, t: Tensor, step: int) -> Tensor:
        return model(batch.tokens, x, t, batch.offsets, batch.mask, return_logits=return_logits).velocity

    return velocity


def encode_prompts(
    model: Showo2, prompts: Sequence[str | Sequence[int]], tokenizer: TextTokenizer | None
) -> list[list[int]]:
    """Checked token ids of every prompt (``flashu_fx.inputs.prompt_ids``): the same errors on every path."""
    return prompt_ids(model.config, prompts, tokenizer)


@torch.no_grad()
def generate_images(
    model: Showo2,
    prompts: Sequence[str | Sequence[int]],
    tokenizer: TextTokenizer | None = None,
    steps: int = 50,
    guidance: float | Sequence[float] = 7.5,
    seed: int = 0,
    shift: float = 3.0,
    progress: bool = False,
    velocity: VelocityFn | None = None,
    seeds: Sequence[int] | None = None,
) -> Tensor:
    """Latents (B, C, h, w) fp32 for B prompts. ``steps`` grid points = ``steps - 1`` model calls.

    ``guidance`` 0 disables CFG; a sequence gives one scale per call; every scale finite and >= 0.
    ``velocity`` replaces the eager model call (FlashU and compiled models plug in here). The noise comes from one
    generator seeded with ``seed``; ``seeds`` (one per prompt) draws each prompt's noise from its own generator
    instead, so an image does not depend on how the prompts are batched (``sampler.draw_noise_per_prompt``).
    """
    ids = encode_prompts(model, prompts, tokenizer)
    check_guidance(guidance, per_call=True)
    check_baseline_steps(steps, None, name="steps")
    device = next(model.parameters()).device
    guided = not (isinstance(guidance, (int, float)) and guidance == 0)
    batch = build_gen_batch(model.config, ids, guided=guided).to(device)
    h, w = model.config.latent_size
    noise = initial_noise((len(ids), model.config.latent_channels, h, w), seed, seeds).to(device)
    fn = velocity or eager_velocity(model, batch)
    return euler_sample(fn, noise, time_grid(steps, shift), guidance if guided else None, progress)
