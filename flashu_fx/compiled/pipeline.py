"""Text-to-image through a model compiled with ``flashu_backend``: the eager pipeline's batch, noise and
Euler/CFG loop, each model call inside ``backend.step(k)``.

>>> import torch
>>> from flashu_fx import FlashUConfig, Showo2, get_config, init_random_weights
>>> from flashu_fx.compiled import flashu_backend, generate_images_compiled
>>> model = init_random_weights(Showo2(get_config("tiny"))).eval()
>>> backend = flashu_backend("gen")                      # exact optimizations only
>>> gen = torch.compile(model, backend=backend)
>>> generate_images_compiled(gen, backend, [[5, 6, 7]], baseline_steps=4, guidance=5.0).shape
torch.Size([1, 16, 8, 8])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flashu_fx.compiled.backend import FlashUBackend
from flashu_fx.compiled.repeat_calls import loop_call
from flashu_fx.config import Showo2Config
from flashu_fx.flashu_gen import ffn_ranges_per_layer
from flashu_fx.inputs import check_baseline_steps, check_guidance
from flashu_fx.layout import GenBatch, build_gen_batch, mark_length_dynamic
from flashu_fx.sampler import VelocityFn, euler_sample, initial_noise, time_grid
from flashu_fx.t2i import encode_prompts
from flashu_fx.tokenizer import TextTokenizer


def stepped_velocity(compiled: torch.nn.Module, backend: FlashUBackend, batch: GenBatch) -> VelocityFn:
    """The compiled model as a VelocityFn for ``euler_sample``: call ``step`` runs inside ``backend.step``.
    The CFG sampler feeds equal cond/null latents, so the image features are computed once. Calls after the
    image's first run only the Dynamo guards that tell captured graphs apart (``repeat_calls.loop_call``)."""

    def velocity(x: Tensor, t: Tensor, step: int) -> Tensor:
        with backend.step(step, cfg_shared_latents=batch.guided), loop_call(step):
            return compiled(batch.tokens, x, t, batch.offsets, batch.mask, return_logits=False).velocity

    return velocity


CUTS = 16  # the compiled batch lengths are multiples of max_seq_len / CUTS


def compiled_batch(config: Showo2Config, batch: GenBatch) -> GenBatch:
    """The batch to call the compiled model with: the batch cut after its last slot (exact: the positions after it
    are dead for the velocity, ``GenBatch.through_last_slot``) to a multiple of ``max_seq_len / CUTS``, with its
    length a Dynamo symbol, so one capture serves every cut and the parts compile for a symbolic length."""
    cut = batch.through_last_slot(config.image_slot_len, max(1, config.max_seq_len // CUTS))
    # contiguous once here, not copied on every call (``contiguous_per_call``)
    cut = GenBatch(cut.tokens.contiguous(), cut.offsets, cut.mask.contiguous(), cut.num_prompts, cut.prompt_lens)
    mark_length_dynamic(cut.tokens, cut.mask)
    return cut


@torch.no_grad()
def generate_images_compiled(
    compiled: torch.nn.Module,
    backend: FlashUBackend,
    prompts: Sequence[str | Sequence[int]],
    tokenizer: TextTokenizer | None = None,
    baseline_steps: int = 50,
    guidance: float = 10.0,
    seed: int = 0,
    shift: float = 3.0,
    progress: bool = False,
    seeds: Sequence[int] | None = None,
) -> Tensor:
    """Latents (B, C, h, w). FlashU runs ``config.num_points(baseline_steps)`` grid points; exact-only all.
    ``seeds``: one noise seed per prompt, as in ``generate_images``."""
    ids = encode_prompts(compiled, prompts, tokenizer)
    check_guidance(guidance, per_call=False)
    check_baseline_steps(baseline_steps, backend.config)
    if backend.config is not None:  # the layout was made for these (permuted) weights: checked once per weight set
        ffn_ranges_per_layer(compiled, backend.config, backend.layout, "gen")
    if guidance == 0:
        raise ValueError("guidance=0 is invalid here: generate_images_compiled needs classifier-free guidance "
                         "(allowed a finite number > 0)")
    cfg = compiled.config
    device = next(compiled.parameters()).device
    batch = compiled_batch(cfg, build_gen_batch(cfg, ids, guided=True).to(device))
    points = baseline_steps if backend.config is None else backend.config.num_points(baseline_steps)
    plans = backend.begin_image(points - 1, guidance)
    h, w = cfg.latent_size
    noise = initial_noise((len(ids), cfg.latent_channels, h, w), seed, seeds).to(device)
    velocity = stepped_velocity(compiled, backend, batch)
    return euler_sample(velocity, noise, time_grid(points, shift), [p.guidance for p in plans], progress)
