"""Train the testbed Show-o2 on its world: Show-o2's joint objective, from scratch, in minutes on one GPU.

One step draws ``batch_gen`` generation rows and ``batch_und`` understanding rows from the pools and runs ONE
forward of ``Showo2`` over all of them:
- flow matching on the generation rows (docs/SHOWO2.md §3.3, §3.9): x_t = t x1 + (1 - t) x0, the velocity target
  x1 - x0, t logit-normal with Show-o2's resolution shift; the caption is dropped (the CFG null row) with
  probability ``caption_dropout``; ``foreground_weight`` > 0 up-weights the MSE at latent positions on objects;
- next-token cross-entropy on the answers of the understanding rows (clean image, t = 1).
AdamW with warm-up and cosine decay, bf16 autocast on CUDA, gradient clipping, and an EMA of the weights (the
weights that ship).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from flashu_fx.masks import omni_mask
from flashu_fx.model import Showo2
from flashu_fx.shapes import round_up
from flashu_fx.testbed import codec
from flashu_fx.testbed.data import IGNORE, GenPool, UndPool
from flashu_fx.testbed.world import check_category_weights


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a testbed training run (defaults: the first of the runs behind the shipped weights; testbed.json
    records each run's settings)."""

    steps: int = 30_000  # optimizer steps (the run stops earlier at ``time_budget_s``)
    batch_gen: int = 256  # generation rows per step
    batch_und: int = 128  # understanding rows per step
    lr: float = 1e-3  # peak learning rate (AdamW)
    warmup: int = 500  # linear warm-up steps, then cosine decay to 10% of ``lr``
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    caption_dropout: float = 0.1  # share of generation rows trained as the CFG null row
    und_loss_weight: float = 1.0  # weight of the answer cross-entropy against the flow loss
    # Extra flow-loss weight on latent positions covered by objects (1 + w * covered share, each row's mean
    # rescaled to 1): the black background otherwise dominates the MSE and small objects' colour and shape go
    # weakly rewarded. 0: the plain MSE.
    foreground_weight: float = 0.0
    ema_decay: float = 0.999  # EMA of the weights, the ones saved
    pool_gen: int = 300_000  # rendered generation examples
    pool_und: int = 300_000  # rendered understanding examples
    # How often each caption category (world.CATEGORIES order) is drawn for the generation pool; None: uniform.
    category_weights: tuple[float, ...] | None = None
    seed: int = 0
    time_budget_s: float = 0.0  # stop after this many seconds of training (0 = run every step)
    compile: str = ""  # torch.compile backend for the training forward and backward ("" = eager)
    # (parameter-name prefix, learning-rate multiplier) pairs: e.g. the image embedders and fusion_proj, whose
    # weights carry the noise the velocity must remove and get little gradient for it (docs/QUALITY.md). A
    # parameter takes the first prefix it starts with; others the plain schedule.
    lr_scales: tuple[tuple[str, float], ...] = ()
    # Every this many steps, ``train``'s ``probe`` runs on the EMA weights and its numbers join the loss log (0: never)
    probe_every: int = 0
    # The training t's shift s (t -> t / (t + s - s t), more t near the noise end as s grows); 0: Show-o2's own,
    # s = exp(mu(image_slot_len)), 1.62 at the testbed's 144 image tokens. The sampler's grid uses s = 3, so Show-o2's
    # training shift gives the noisy steps, where the layout is decided, fewer samples than sampling calls.
    time_shift: float = 0.0
    # Share of the generation rows whose t is drawn at the noise end instead (shift NOISE_END_SHIFT: median t 0.02).
    # There x_t shows nothing of the picture, so the caption is the only evidence for the layout: the relation and
    # colour words are learned there; Show-o2's t puts 4% of its rows below 0.1 and 0.7% below 0.05. 0: none.
    noise_end_share: float = 0.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_gen", "batch_und", "pool_gen", "pool_und"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 1")
        if self.probe_every < 0:
            raise ValueError(f"TrainConfig.probe_every={self.probe_every} must be >= 0 (0: no probe)")
        if self.category_weights is not None:
            object.__setattr__(self, "category_weights", check_category_weights(self.category_weights))
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"TrainConfig.caption_dropout={self.caption_dropout} must lie in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"TrainConfig.ema_decay={self.ema_decay} must lie in [0, 1)")
        if not self.foreground_weight >= 0:  # also refuses NaN
            raise ValueError(f"TrainConfig.foreground_weight={self.foreground_weight} must be >= 0 (0: unweighted)")
        object.__setattr__(self, "lr_scales", check_lr_scales(self.lr_scales))
        if not self.time_shift >= 0:  # also refuses NaN
            raise ValueError(f"TrainConfig.time_shift={self.time_shift} must be > 0 (or 0: Show-o2's own shift)")
        if not 0 <= self.noise_end_share <= 1:  # also refuses NaN
            raise ValueError(f"TrainConfig.noise_end_share={self.noise_end_share} must lie in [0, 1] (0: none)")
        if self.compile:
            from torch._dynamo import list_backends  # Dynamo loads only when a compiled run is asked for

            known = list_backends(exclude_tags=())
            if self.compile not in known:
                raise ValueError(f"TrainConfig.compile={self.compile!r} is not a torch.compile backend: allowed "
                                 f"\"\" (eager) or one of {', '.join(known)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


POSITION_INITS = ("normal", "sincos")  # how init_for_training starts the image position table
NOISE_END_SHIFT = 50.0  # the shift of the noise-end rows' t (TrainConfig.noise_end_share)


@torch.no_grad()
def init_for_training(model: Showo2, seed: int = 0, position_init: str = "normal") -> Showo2:
    """A from-scratch init: linears and embeddings N(0, 0.02), biases 0, norms 1, and (as in DiT and upstream)
    every adaLN modulation and the final projection zero, so the head starts as the identity and v = 0.

    ``position_init="sincos"`` starts the image position table (the SigLIP-style ``position_embedding``, the only
    absolute 2-D position the image tokens get: the trunk's RoPE is 1-D and relative) as DiT's and MAE's fixed 2-D
    sine-cosine table (``sincos_2d``), learned from there; "normal": N(0, 0.02) like every other table."""
    if position_init not in POSITION_INITS:
        raise ValueError(f"position_init={position_init!r} is invalid: allowed one of {POSITION_INITS}")
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "adaLN_modulation" in name or name.startswith("diffusion_head_b.linear"):
            p.zero_()
        elif p.dim() == 1 and ("norm" in name or name.startswith("fusion_proj.0")):
            p.fill_(1.0) if name.endswith("weight") else p.zero_()
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    if position_init == "sincos":  # after the loop: every other parameter draws what it draws under "normal"
        model.position_embedding.weight.copy_(sincos_like(model.position_embedding.weight))
    model.reset_rope_buffers()
    return model


@torch.no_grad()
def graft_sincos(model: Showo2, scale: float) -> Showo2:
    """Add ``scale`` x the 2-D sine-cosine table (``sincos_2d``, row norm 8 at width 128) to a trained model's image
    position table, so a lineage started from N(0, 0.02) gets the absolute column its trunk never learned (a trained
    table's rows have norm about 2, swamped by the content and dropped by ``und_trans`` and ``fusion_proj``). The
    rest of the weights stay; training then adapts them. Returns the model."""
    if not scale > 0:  # also refuses NaN
        raise ValueError(f"graft_sincos: scale={scale} is invalid: allowed a number > 0")
    model.position_embedding.weight.add_(scale * sincos_like(model.position_embedding.weight))
    return model


def sincos_like(table: Tensor) -> Tensor:
    """``sincos_2d`` for a square grid's position table (side * side, dim), in the table's dtype and device."""
    return sincos_2d(math.isqrt(table.shape[0]), table.shape[1]).to(table)


def sincos_2d(side: int, dim: int) -> Tensor:
    """The fixed 2-D sine-cosine position table of a side x side grid (MAE, DiT): (side * side, dim) fp32, rows in
    raster order; the first half of the channels encodes the grid row, the second the column, each as the sines then
    the cosines of the position at dim / 4 frequencies 1 / 10000^(k / (dim / 4)), k = 0 .. dim / 4 - 1."""
    if side < 1 or dim < 4 or dim % 4:
        raise ValueError(f"sincos_2d needs side >= 1 and dim a multiple of 4, got side={side}, dim={dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                                indexing="ij")
    halves = []
    for position in (rows.flatten(), cols.flatten()):
        angle = position[:, None] * omega[None]
        halves += [angle.sin(), angle.cos()]
    return torch.cat(halves, dim=1).float()


def sample_flow_time(n: int, seq_len: int, generator: torch.Generator, device, shift: float = 0.0) -> Tensor:
    """Show-o2's training t (docs/SHOWO2.md §3.9): sigmoid(N(0, 1)), shifted to t / (t + s - s t) with
    s = exp(mu(seq_len)), or ``shift`` when > 0. (n,) fp32 in (0, 1), drawn on ``device`` with ``generator`` (which
    must live there)."""
    u = torch.randn(n, generator=generator, device=device)
    t = torch.sigmoid(u).clamp(1e-5, 1 - 1e-5)
    s = shift if shift > 0 else math.exp(0.5 + (1.15 - 0.5) / (4096 - 256) * (seq_len - 256))
    return t / (t + s - s * t)


def check_lr_scales(pairs) -> tuple[tuple[str, float], ...]:
    """``pairs`` of (parameter-name prefix, learning-rate multiplier) as a tuple of (str, float); raises on an empty
    prefix or a multiplier that is not > 0 (NaN included)."""
    checked = tuple((str(prefix), float(scale)) for prefix, scale in pairs)
    for prefix, scale in checked:
        if not prefix or not scale > 0:
            raise ValueError(f"lr_scales has ({prefix!r}, {scale}): each needs a non-empty parameter name prefix and "
                             "a multiplier > 0")
    return checked


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices but embeddings, and each group's ``lr_scale`` from ``cfg.lr_scales``
    (1 for a parameter no prefix names). Raises on a prefix that names no parameter."""
    groups: dict[tuple[bool, float], list[Tensor]] = {}
    used = set()
    for name, p in model.named_parameters():
        prefix, scale = next(((pre, x) for pre, x in cfg.lr_scales if name.startswith(pre)), (None, 1.0))
        used.add(prefix)
        decays = p.dim() >= 2 and "embed" not in name
        groups.setdefault((decays, scale), []).append(p)
    unused = [pre for pre, _ in cfg.lr_scales if pre not in used]
    if unused:
        tops = sorted({name.split(".")[0] for name, _ in model.named_parameters()})
        raise ValueError(f"TrainConfig.lr_scales prefixes {unused} name no parameter of the model; parameter names "
                         f"start with one of {tops}")
    return [{"params": params, "weight_decay": cfg.weight_decay if decays else 0.0, "lr_scale": scale}
            for (decays, scale), params in groups.items()]


def lr_at(step: int, done: float, cfg: TrainConfig) -> float:
    """Linear warm-up over ``cfg.warmup`` steps, then cosine decay to 10% by ``done`` = 1 (the share of the run
    done: of the steps, or of the time budget, whichever is further)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, done))))


def flow_weights(images: Tensor, foreground_weight: float) -> Tensor:
    """Per-position flow-loss weights of clean images uint8 (B, S, S, 3): fp32 (B, 1, S/2, S/2), 1 +
    ``foreground_weight`` * the share of the position's 2x2 pixel block that is not black, scaled so each row's
    mean is 1 (the loss keeps the unweighted MSE's scale; ``foreground_weight`` = 0 gives all ones)."""
    covered = (images > 0).any(dim=-1)[:, None].float()  # (B, 1, S, S): any channel lit
    weight = 1 + foreground_weight * F.avg_pool2d(covered, codec.FACTOR)
    return weight / weight.mean(dim=(1, 2, 3), keepdim=True)


def used_length(gen: GenPool, und: UndPool, pad: int, multiple: int = 8) -> int:
    """The positions the pools' rows use: one past the last token other than ``pad`` of any row (the CFG null row
    included), rounded up to ``multiple`` (at most the rows' length). Training cuts every batch there
    (``joint_batch(length=)``): the positions after it are pads after every row's last token, which the omni mask's
    causal part keeps out of every earlier position, and carry no target, so the loss is the same. The testbed's
    rows use 173 of 192 positions (176 kept). The ends are read once per run (a sync), before the first step."""
    full = gen.tokens.shape[1]
    used = (gen.tokens != pad).any(0) | (gen.null_tokens != pad) | (und.tokens != pad).any(0)  # (L,) by some row
    end = int(used.nonzero().max()) + 1
    return min(full, round_up(end, multiple))


def joint_batch(model: Showo2, gen: GenPool, und: UndPool, cfg: TrainConfig, generator: torch.Generator,
                length: int | None = None) -> dict[str, Tensor]:
    """One step's rows [generation ..., understanding ...] with their inputs and targets, on the pools' device;
    ``length``: the positions kept (``used_length``; None: all).

    Every random draw uses ``generator``, which lives on the pools' device: drawing the noise on the CPU and
    copying it took 20 ms a step on an H200 box, a quarter of a compiled step.
    """
    mcfg, device = model.config, gen.tokens.device
    length = gen.tokens.shape[1] if length is None else length
    if generator.device != device:
        raise ValueError(f"the generator is on {generator.device} but the pools are on {device}: make it with "
                         f"torch.Generator({str(device)!r})")
    draw = dict(generator=generator, device=device)
    gi = torch.randint(len(gen.tokens), (cfg.batch_gen,), **draw)
    ui = torch.randint(len(und.tokens), (cfg.batch_und,), **draw)
    drop = torch.rand(cfg.batch_gen, **draw) < cfg.caption_dropout
    g_tokens = torch.where(drop[:, None], gen.null_tokens[None, :length], gen.tokens[gi, :length])
    g_offsets = torch.where(drop, torch.full_like(gen.offsets[gi], 2), gen.offsets[gi])
    images = gen.images[gi]
    x1 = codec.encode(images)
    x0 = torch.randn(x1.shape, **draw)
    t = sample_flow_time(cfg.batch_gen, mcfg.image_slot_len, generator, device, cfg.time_shift)
    if cfg.noise_end_share:  # no extra draws without it: earlier runs' batches stay bit for bit
        at_end = torch.rand(cfg.batch_gen, **draw) < cfg.noise_end_share
        t = torch.where(at_end, sample_flow_time(cfg.batch_gen, 0, generator, device, NOISE_END_SHIFT), t)
    xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0
    slot = mcfg.image_slot_len
    mask = torch.cat([omni_mask(g_offsets, length, slot), omni_mask(und.block_offsets[ui], length, slot)])
    return dict(
        tokens=torch.cat([g_tokens, und.tokens[ui, :length]]),
        latents=torch.cat([xt, codec.encode(und.images[ui])]),
        t=torch.cat([t, torch.ones(cfg.batch_und, device=device)]),
        offsets=torch.cat([g_offsets, und.offsets[ui]]),
        mask=mask,
        velocity_target=x1 - x0,
        flow_weight=flow_weights(images, cfg.foreground_weight),
        answer_targets=und.targets[ui, :length],
    )


def joint_loss(model: Showo2, batch: dict[str, Tensor], cfg: TrainConfig) -> tuple[Tensor, Tensor, Tensor]:
    """(total, flow MSE, answer cross-entropy) of one joint batch; the flow MSE is weighted by ``flow_weight``
    when ``cfg.foreground_weight`` > 0."""
    out = model(batch["tokens"], batch["latents"], batch["t"], batch["offsets"], batch["mask"], return_logits=True)
    n_gen = batch["velocity_target"].shape[0]
    velocity = out.velocity[:n_gen].float()
    if cfg.foreground_weight:
        flow = (batch["flow_weight"] * (velocity - batch["velocity_target"]).square()).mean()
    else:  # the plain MSE, bit for bit as before the option
        flow = F.mse_loss(velocity, batch["velocity_target"])
    logits = out.logits[n_gen:].float()
    ce = F.cross_entropy(logits.flatten(0, 1), batch["answer_targets"].flatten(), ignore_index=IGNORE)
    return flow + cfg.und_loss_weight * ce, flow, ce


def train(model: Showo2, gen: GenPool, und: UndPool, cfg: TrainConfig, progress: bool = True,
          probe: Callable[[Showo2], dict[str, float]] | None = None) -> tuple[Showo2, list[dict[str, float]]]:
    """Train ``model`` in place on the pools (on the model's device); returns the EMA model and the loss log.

    The log holds one entry per 50 steps: step, seconds, lr, total, flow and answer losses; and every
    ``cfg.probe_every`` steps (from step ``probe_every`` on) one with ``probe(ema)``'s numbers too (e.g. how far the
    velocity follows the binding words: ``diagnostics.velocity_sensitivity``), run without gradients.
    """
    device = next(model.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.98), fused=device.type == "cuda")
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    generator = torch.Generator(gen.tokens.device).manual_seed(cfg.seed)
    length = used_length(gen, und, model.config.specials.pad)  # every batch cut there: the same loss, less work
    forward = torch.compile(model, backend=cfg.compile) if cfg.compile else model  # same parameters
    log: list[dict[str, float]] = []
    shown: dict[str, str] = {}
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="training testbed", disable=not progress)
    for step in bar:
        elapsed = time.perf_counter() - start
        done = max(step / cfg.steps, elapsed / cfg.time_budget_s if cfg.time_budget_s else 0.0)
        if done >= 1.0:
            break
        lr = lr_at(step, done, cfg)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        batch = joint_batch(model, gen, und, cfg, generator, length)
        with autocast:
            loss, flow, ce = joint_loss(forward, batch, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - min(cfg.ema_decay, (1 + step) / (10 + step)))
        probing = probe is not None and cfg.probe_every > 0 and step > 0 and step % cfg.probe_every == 0
        if step % 50 == 0 or step == cfg.steps - 1 or probing:
            entry = dict(step=step, seconds=elapsed, lr=lr, loss=float(loss.detach()), flow=float(flow.detach()),
                         answer=float(ce.detach()))
            if probing:
                with torch.no_grad():
                    probed = probe(ema)
                entry.update(probed)
                shown = {k: f"{v:.3f}" for k, v in probed.items()}  # the last probe's, until the next
            log.append(entry)
            bar.set_postfix(loss=f"{entry['loss']:.4f}", flow=f"{entry['flow']:.4f}", answer=f"{entry['answer']:.4f}",
                            **shown)
    model.eval()
    return ema, log
