"""What the testbed's flow loss is made of (image content against noise removal, direction by direction), and
whether its pictures follow the caption words that bind (``caption_sensitivity``).

The flow target of a latent position is x1 - x0. Encoded images span 12 of the 16 latent directions
(``codec.data_projector``); in the other 4 the target is -x0 alone, and in all 16 the target's x0 part is a linear
function of the noisy input x_t = t x1 + (1 - t) x0. A model that has learned the noise removes it exactly, whatever
it draws: regressed on x0 (least squares over background positions, one 16 x 16 map per latent pixel), its
velocity's noise part is -I. ``flow_loss_parts`` measures both: the MSE inside and outside the image directions,
and the eigenvalues of that map (1: the noise in a direction removed; 0: left in the picture).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from flashu_fx.config import Showo2Config
from flashu_fx.layout import build_gen_batch
from flashu_fx.model import Showo2, unpatchify
from flashu_fx.t2i import generate_images
from flashu_fx.testbed import codec, scorer, world
from flashu_fx.testbed.tokenizer import WordTokenizer


@dataclass(frozen=True)
class FlowLossParts:
    """The flow MSE at one t, split over the image directions and the 4 others, and the noise-removal spectrum."""

    t: float
    image_mse: float  # per latent element, the image directions' share of the MSE
    null_mse: float  # the same for the 4 directions no image uses (target -x0: 0.25 when predicted as 0)
    removal: tuple[float, ...]  # eigenvalues (ascending, 16) of the map from x0 to minus the velocity's noise part

    @property
    def mse(self) -> float:
        return self.image_mse + self.null_mse


def _directions(projector: Tensor, z: Tensor) -> Tensor:
    """(16, 16) projector applied to latents (B, 16, h, w) channel-wise."""
    return torch.einsum("ij,bjhw->bihw", projector, z)


def renders_of(prompts: Sequence[world.GenPrompt], rng: np.random.Generator) -> Tensor:
    """One scene per prompt, drawn from ``rng`` to satisfy it, rendered: uint8 (N, S, S, 3)."""
    return torch.from_numpy(world.render_batch([world.scene_for_prompt(p, rng) for p in prompts]))


def noised(x1: Tensor, t: float, seed: int) -> Tensor:
    """x_t = t x1 + (1 - t) x0, the noise x0 drawn on the CPU from ``seed`` (the same for every device)."""
    return t * x1 + (1 - t) * torch.randn(x1.shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def flow_loss_parts(model: Showo2, tokenizer: WordTokenizer, times: Sequence[float] = (0.1, 0.4, 0.8),
                    n: int = 32, seed: int = 0) -> list[FlowLossParts]:
    """The flow loss of ``n`` held-out prompts' renders at each t in ``times``, one model call per t (the caption
    given, no CFG), split as ``FlowLossParts``. Runs on the model's device and dtype."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    prompts = world.heldout_gen_prompts(n, seed)
    rng = world.rng_for("heldout", seed + 1)
    images = renders_of(prompts, rng)
    batch = build_gen_batch(model.config, [tokenizer.encode(p.caption) for p in prompts], guided=False).to(device)

    def velocity(xt: Tensor, t: float) -> Tensor:
        return model(batch.tokens, xt.to(dtype), torch.full((n,), t, device=device), batch.offsets, batch.mask,
                     return_logits=False).velocity

    shape = (n, codec.LATENT_CHANNELS, *model.config.latent_size)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return split_flow_loss(velocity, images, x0.to(device), times)


def split_flow_loss(velocity: Callable[[Tensor, float], Tensor], images: Tensor, x0: Tensor,
                    times: Sequence[float]) -> list[FlowLossParts]:
    """``FlowLossParts`` of a velocity function (x_t (B, 16, h, w), t) -> (B, 16, h, w) on world images uint8
    (B, 2h, 2w, 3) with noise ``x0`` (B, 16, h, w), at each t in ``times``."""
    if not times or not all(0 < t < 1 for t in times):
        raise ValueError(f"times must be values in (0, 1), got {list(times)}")
    device = x0.device
    x1 = codec.encode(images).to(device)
    data = codec.data_projector(device)
    null = torch.eye(data.shape[0], device=device) - data
    # background latent positions (no lit pixel in their 2x2 block): the clean part there is known exactly
    background = F.max_pool2d((images > 0).any(-1)[:, None].float(), codec.FACTOR)[:, 0].to(device) == 0
    parts = []
    for t in times:
        v = velocity(t * x1 + (1 - t) * x0, t).float()
        error = v - (x1 - x0)
        noise_part = (x1 - v).permute(0, 2, 3, 1)[background].double()  # minus the velocity's noise part
        source = x0.permute(0, 2, 3, 1)[background].double()
        removal_map = torch.linalg.lstsq(source, noise_part).solution.T  # noise_part ~ source @ map.T
        eigenvalues = torch.linalg.eigvalsh((removal_map + removal_map.T) / 2).cpu().numpy()
        parts.append(FlowLossParts(
            t=float(t),
            image_mse=float(_directions(data, error).square().mean()),
            null_mse=float(_directions(null, error).square().mean()),
            removal=tuple(float(np.round(e, 4)) for e in eigenvalues),
        ))
    return parts


# ---- does the picture follow the words that bind? ------------------------------------------------------------
EDIT_CATEGORY = {"relation": "position", "colors": "color_attr"}  # each caption edit and the prompts it applies to
EDITS = tuple(EDIT_CATEGORY)
CHANGED_PIXELS = 1.0  # mean absolute difference (of 255) above which two pictures count as different


@dataclass(frozen=True)
class CaptionSensitivity:
    """How a caption edit moves the picture, the noise fixed. ``relation``: a position prompt's relation reversed
    ("a circle left of a square" -> "right of"); ``colors``: a colour-attribution prompt's two colours exchanged (the
    same words in another order, so a model that reads a caption as a bag of words draws the same picture)."""

    edit: str
    prompts: int
    pixel_change: float  # mean over the pairs of the mean absolute pixel difference (0-255) between the pictures
    changed: float  # share of the pairs whose pictures differ by more than CHANGED_PIXELS
    original_correct: float  # share of the original prompts the scorer accepts
    edited_correct: float  # the same for the edited prompts


def _edit_category(edit: str) -> str:
    if edit not in EDIT_CATEGORY:
        raise ValueError(f"edit must be one of {EDITS}, got {edit!r}")
    return EDIT_CATEGORY[edit]


def edited_prompt(prompt: world.GenPrompt, edit: str) -> world.GenPrompt:
    """``prompt`` under ``edit`` ("relation": a position prompt's relation reversed; "colors": a colour-attribution
    prompt's colours exchanged)."""
    category = _edit_category(edit)
    if prompt.category != category:
        raise ValueError(f"the {edit!r} edit applies to {category} prompts, got a {prompt.category} prompt")
    if edit == "relation":
        return world.make_gen_prompt(category, prompt.objects, scorer.OPPOSITE[prompt.relation])
    (c1, s1, n1), (c2, s2, n2) = prompt.objects
    return world.make_gen_prompt(category, [(c2, s1, n1), (c1, s2, n2)])


class ScoredPictures(NamedTuple):
    """``score_generation``'s result: the scorer's verdict per prompt, the pictures uint8 (N, S, S, 3), and what the
    detector found in each (for a caller that also sorts the misses, ``scorer.miss_causes``)."""

    correct: list[bool]
    images: np.ndarray
    found: list[list[scorer.Detection]]


def score_generation(model: Showo2, tokenizer: WordTokenizer, prompts: Sequence[world.GenPrompt], guidance: float,
                     steps: int, seed: int = 0, seeds: Sequence[int] | None = None) -> ScoredPictures:
    """Draw ``prompts`` in one batch (noise from ``seed``, or one seed per prompt: ``generate_images``), decode,
    detect and score each picture once."""
    latents = generate_images(model, [p.caption for p in prompts], tokenizer, steps=steps, guidance=guidance,
                              seed=seed, seeds=seeds)
    images = codec.decode(latents).cpu().numpy()
    found = [scorer.detect(image) for image in images]
    return ScoredPictures([scorer.score_detections(p, f) for p, f in zip(prompts, found, strict=True)], images, found)


@torch.no_grad()
def caption_sensitivity(model: Showo2, tokenizer: WordTokenizer, edit: str, n: int = 16, steps: int = 50,
                        guidance: float = 4.0, seed: int = 0) -> CaptionSensitivity:
    """Draw ``n`` held-out prompts of the edit's category and their edited twins with the same noise (seeds
    0..n-1), decode, and compare the pictures (``CaptionSensitivity``). Runs on the model's device and dtype."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = world.rng_for("heldout", seed)
    prompts = [world.sample_gen_prompt(rng, _edit_category(edit)) for _ in range(n)]
    edited = [edited_prompt(p, edit) for p in prompts]
    noise = list(range(n))  # each pair's two pictures start from the same noise
    first_correct, first, _ = score_generation(model, tokenizer, prompts, guidance, steps, seeds=noise)
    edited_correct, second, _ = score_generation(model, tokenizer, edited, guidance, steps, seeds=noise)
    change = np.abs(first.astype(np.int16) - second.astype(np.int16)).reshape(n, -1).mean(axis=1)
    return CaptionSensitivity(
        edit=edit, prompts=n, pixel_change=float(change.mean()), changed=float((change > CHANGED_PIXELS).mean()),
        original_correct=float(np.mean(first_correct)), edited_correct=float(np.mean(edited_correct)),
    )


@torch.no_grad()
def velocity_sensitivity(model: Showo2, tokenizer: WordTokenizer, edit: str, n: int = 16, t: float = 0.2,
                         seed: int = 0) -> float:
    """How much of the caption's pull on one model call ``edit`` moves: the mean over ``n`` held-out prompts of the
    edit's category of ||v(caption) - v(edited)|| / ||v(caption) - v(null)||, at x_t = t x1 + (1 - t) x0 (x1 the
    original prompt's render, t near 0 the noisy start where the layout is decided). About 0 for a model that reads
    the caption as a bag of words, where it ignores the edit; a layout- and colour-faithful one moves by a share of
    its whole caption pull (the edited twin draws another picture). One forward of 4n rows; cheap enough to watch
    during training. Runs on the model's device in fp32 (a copy when the model is not): in bf16 the rounding of two
    different rows' velocities does not cancel and reads as a share several times too large (0.36 against 0.085 for
    the same weights)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 < t < 1:
        raise ValueError(f"t must lie in (0, 1), got {t}")
    if next(model.parameters()).dtype != torch.float32:
        model = copy.deepcopy(model).float()
    device, dtype = next(model.parameters()).device, torch.float32
    rng = world.rng_for("heldout", seed)
    prompts = [world.sample_gen_prompt(rng, _edit_category(edit)) for _ in range(n)]
    captions = [tokenizer.encode(p.caption) for p in [*prompts, *(edited_prompt(p, edit) for p in prompts)]]
    batch = build_gen_batch(model.config, captions, guided=True).to(device)  # rows: originals, edited, 2n nulls
    xt = noised(codec.encode(renders_of(prompts, rng)), t, seed).to(device, dtype).repeat(4, 1, 1, 1)
    v = model(batch.tokens, xt, torch.full((4 * n,), t, device=device), batch.offsets, batch.mask,
              return_logits=False).velocity.float().flatten(1)
    original, edited, null = v[:n], v[n : 2 * n], v[2 * n : 3 * n]
    pull = (original - null).norm(dim=1)
    return float(((original - edited).norm(dim=1) / pull.clamp_min(1e-12)).mean())


def world_sensitivity(edit: str, n: int = 8, scenes: int = 400, seed: int = 0) -> float:
    """``velocity_sensitivity`` of a model that knows the world exactly, at the noisy start (t -> 0): there the
    velocity's caption part is the mean latent of the scenes the caption allows, so the share is ||mean(caption) -
    mean(edited)|| / ||mean(caption) - mean(any caption)||, each mean over ``scenes`` renders, averaged over ``n``
    held-out prompts of the edit's category. What a trained model's share is to approach (CPU, seconds)."""
    if n < 1 or scenes < 1:
        raise ValueError(f"n and scenes must be >= 1, got n={n}, scenes={scenes}")
    rng = world.rng_for("heldout", seed)

    def mean_latent(prompts: Sequence[world.GenPrompt]) -> Tensor:
        return codec.encode(renders_of(prompts, rng)).mean(0)

    unconditional = mean_latent([world.sample_gen_prompt(rng) for _ in range(scenes)])
    shares = []
    for _ in range(n):
        prompt = world.sample_gen_prompt(rng, _edit_category(edit))
        original, edited = mean_latent([prompt] * scenes), mean_latent([edited_prompt(prompt, edit)] * scenes)
        shares.append(float((original - edited).norm() / (original - unconditional).norm()))
    return float(np.mean(shares))


@torch.no_grad()
def grid_position_r2(model: Showo2, tokenizer: WordTokenizer, n: int = 32, t: float = 0.2, seed: int = 0
                     ) -> dict[str, tuple[float, float, float, float]]:
    """Whether the image tokens know where they are: for the fused image embeddings (``"input"``, what the trunk
    receives), each decoder layer's output (``"layer.i"``) and each diffusion-head block's (``"head.i"``), the held-out
    R^2 of ridge probes that read, from each image token's hidden state, its patch's grid row and column and the row
    and column where its velocity lands (the centre of the latent pixels ``unpatchify`` gives it: Show-o2's output
    token k covers 4 raster-consecutive latent pixels, not its own patch), in generation rows of ``n`` held-out
    prompts' renders noised to ``t``. Fitted on the first half of the pictures, scored on the other half. A model
    that must put "a circle left of a square" on the left needs the column (the trunk's RoPE is 1-D and relative; the
    image position table is the only absolute 2-D position). -> name: (row, column, output row, output column).
    Runs on the model's device; the probes in fp64 on the CPU."""
    if n < 2:
        raise ValueError(f"n must be >= 2 (half the pictures fit the probes, half score them), got {n}")
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    rng = world.rng_for("heldout", seed)
    prompts = [world.sample_gen_prompt(rng) for _ in range(n)]
    xt = noised(codec.encode(renders_of(prompts, rng)), t, seed)
    batch = build_gen_batch(model.config, [tokenizer.encode(p.caption) for p in prompts], guided=False).to(device)
    side = model.config.latent_size[0] // model.config.patch_size
    cells = torch.arange(side * side, device=device)
    slot = batch.offsets[:, None] + 1 + cells[None]  # the image tokens' rows (after the time token)
    states: dict[str, Tensor] = {}

    def keep(name: str, image_rows: bool):
        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if image_rows:
                hidden = hidden.gather(1, slot[..., None].expand(-1, -1, hidden.shape[-1]))
            states[name] = hidden.double().cpu()
        return hook

    handles = [model.fusion_proj.register_forward_hook(keep("input", image_rows=False))]
    handles += [layer.register_forward_hook(keep(f"layer.{i}", image_rows=True))
                for i, layer in enumerate(model.showo.model.layers)]
    handles += [block.register_forward_hook(keep(f"head.{i}", image_rows=True))
                for i, block in enumerate(model.diffusion_head_a)]
    try:
        model(batch.tokens, xt.to(device, dtype), torch.full((n,), t, device=device),
              batch.offsets, batch.mask, return_logits=False)
    finally:
        for handle in handles:
            handle.remove()
    cells = cells.cpu()
    targets = torch.cat([torch.stack([cells // side, cells % side], dim=1).double(), output_centres(model.config)], 1)
    half = (n // 2) * side * side
    return {name: _ridge_r2(hidden.flatten(0, 1), targets.repeat(n, 1), half) for name, hidden in states.items()}


def output_centres(cfg: Showo2Config) -> Tensor:
    """(tokens, 2) fp64: the mean (row, column) of the latent pixels each output token's velocity lands on, read off
    ``unpatchify`` itself (feature f of token k -> raster pixel 4k + f // C for p = 2)."""
    h, w = cfg.latent_size
    n, features = h * w // cfg.patch_size**2, cfg.patch_size**2 * cfg.latent_channels
    owner = unpatchify(torch.arange(n, dtype=torch.float64)[None, :, None].expand(1, n, features), (h, w),
                       cfg.latent_channels)[0, 0]  # (h, w): which token writes each latent pixel
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
    token = owner.flatten().long()
    sums = torch.zeros(n, 2, dtype=torch.float64).index_add_(0, token, torch.stack([rows, cols], -1).reshape(-1, 2))
    return sums / torch.bincount(token, minlength=n)[:, None]


def _ridge_r2(features: Tensor, targets: Tensor, fit: int, ridge: float = 1.0) -> tuple[float, ...]:
    """Held-out R^2 per target column of a ridge regression (with intercept) fitted on the first ``fit`` rows, the
    features standardised by the fitted rows' statistics (one ridge for every layer's scale)."""
    mean, std = features[:fit].mean(0), features[:fit].std(0).clamp_min(1e-6)
    features = (features - mean) / std
    design = torch.cat([features, torch.ones(len(features), 1, dtype=features.dtype)], dim=1)
    a, b = design[:fit], design[fit:]
    weights = torch.linalg.solve(a.T @ a + ridge * torch.eye(a.shape[1], dtype=a.dtype), a.T @ targets[:fit])
    residual = (b @ weights - targets[fit:]).square().mean(0)
    return tuple(float(1 - r / v) for r, v in zip(residual, targets[fit:].var(0, unbiased=False), strict=True))
