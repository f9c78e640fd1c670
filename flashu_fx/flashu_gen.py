"""Eager FlashU text-to-image: the executable specification of what every denoising call computes.

One call s = step + 1 follows ``gen_schedule(...)[step]`` (docs/SEMANTICS.md has the rules and the table):

    x_t ─ image_embeds ──┐                                    (not run on a plain head-reuse call)
    t ─ time_embeds ─ embed_inputs ─ LLM layers ─ norm ─ diff_proj ─ 10 head blocks ─┐ (compute | store)
                          │  pruned FFN ranges while plan.ffn_pruned     cached head output ─┤ (reuse)
                          │  identity for the skip set while plan.layers == "skip"           │
                          └ "measure": importance_l = 1 - mean cos(in_l, out_l) over the image block
    t ─ time_embeds ───────────────────────────────────────────── FinalLayer(., c_t) ─ extract ─ v

>>> from flashu_fx import FlashUConfig, Showo2, get_config, init_random_weights
>>> model = init_random_weights(Showo2(get_config("tiny"))).eval()
>>> cfg = FlashUConfig.for_task("gen", ffn_prune_ratio=0.0, skip_ratio=0.5)
>>> out = generate_images_flashu(model, ["a red cube"], cfg, None, baseline_steps=10, guidance=5.0)
>>> out.latents.shape, len(out.records), out.records[1].skipped == out.records[0].skip_set
(torch.Size([1, 16, 8, 8]), 6, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from flashu_fx.diffusion_head import in_slot_mask
from flashu_fx.ffn_layout import FFNLayout, check_layout_matches
from flashu_fx.flashu_config import FlashUConfig
from flashu_fx.inputs import check_baseline_steps, check_guidance
from flashu_fx.layout import GenBatch, build_gen_batch
from flashu_fx.model import Showo2
from flashu_fx.qwen2 import NeuronRanges
from flashu_fx.schedule import HeadMode, LayerMode, StepPlan, gen_schedule
from flashu_fx.t2i import encode_prompts, generate_images
from flashu_fx.tokenizer import TextTokenizer


# ---- shared rules (generation and understanding) ----------------------------------------------------
def layer_importance(inputs: Tensor, outputs: Tensor) -> Tensor:
    """1 - mean cosine similarity of matching vectors: (..., H), (..., H) -> fp32 scalar.

    The cosine is ``F.cosine_similarity`` in fp32 over the hidden axis (eps 1e-8); the mean is over every
    leading index (rows x positions). A layer that barely changes its input has importance near 0.
    """
    return 1.0 - F.cosine_similarity(inputs.float(), outputs.float(), dim=-1).mean()


def choose_skip_set(importance: Sequence[float], count: int) -> tuple[int, ...]:
    """The ``count`` layers of lowest importance (ties -> lower index), sorted ascending."""
    ranked = sorted(range(len(importance)), key=lambda i: (importance[i], i))
    return tuple(sorted(ranked[:count]))


def ffn_ranges_per_layer(
    model: Showo2, config: FlashUConfig, layout: FFNLayout | None, task: str
) -> list[NeuronRanges | None]:
    """Per LLM layer, the neuron ranges of ``task``'s pruned FFN (None everywhere when r_p = 0).

    The model's FFN weights must already be permuted by ``layout.order`` (ffn_layout.permute_ffn_weights);
    each layer's kept width must be ``config.kept_ffn_width(I)``.
    """
    ranges = layout_ranges(config, layout, task, model.config.num_layers, model.config.intermediate_size)
    if config.ffn_prune_ratio > 0:
        check_layout_matches(model, layout)
    return ranges


def check_layout_has_task(config: FlashUConfig, layout: FFNLayout | None, task: str) -> None:
    """Raise unless FFN pruning is off or ``layout`` holds ``task``'s neuron ranges."""
    if config.ffn_prune_ratio > 0 and (layout is None or task not in layout.ranges):
        have = None if layout is None else sorted(layout.ranges)
        raise ValueError(
            f"FlashUConfig.ffn_prune_ratio={config.ffn_prune_ratio} needs an FFNLayout with {task!r} ranges, got {have}"
        )


def layout_ranges(config: FlashUConfig, layout: FFNLayout | None, task: str, num_layers: int,
                  inter: int) -> list[NeuronRanges | None]:
    """``ffn_ranges_per_layer`` for a model of ``num_layers`` layers of ``inter`` neurons, known by its shapes only
    (a captured graph's): the same checks of the layout against the config, without the weights' probe."""
    if config.ffn_prune_ratio == 0:
        return [None] * num_layers
    check_layout_has_task(config, layout, task)
    if len(layout.ranges[task]) != num_layers:
        raise ValueError(f"FFNLayout has {len(layout.ranges[task])} {task!r} layers, the model {num_layers}")
    width = config.kept_ffn_width(inter)
    ranges = [layout.task_ranges(task, i) for i in range(num_layers)]
    for i, r in enumerate(ranges):
        got = sum(hi - lo for lo, hi in r)
        if got != width:
            raise ValueError(
                f"FFNLayout keeps {got} {task!r} neurons in layer {i}, but FlashUConfig(ffn_prune_ratio="
                f"{config.ffn_prune_ratio}, ffn_width_multiple={config.ffn_width_multiple}) keeps {width} of {inter}"
            )
    return ranges


def image_block(h: Tensor, offsets: Tensor, slot_len: int) -> Tensor:
    """Each row's image slot (time token + image tokens): h (M, L, H), offsets (M,) -> (M, slot_len, H)."""
    idx = offsets[:, None] + torch.arange(slot_len, device=h.device)[None]
    return h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))


# ---- generation ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenCallRecord:
    """What one denoising call did; the compiled backend must reproduce these decisions exactly."""

    call: int  # s, 1-based (sampler step + 1)
    guidance: float  # g_s, applied by the sampler to this call's velocity
    ffn_pruned: bool  # the "gen" neuron ranges were used (else the full FFN)
    layers: LayerMode  # "all" | "measure" | "skip"
    head: HeadMode  # "compute" | "store" | "reuse"
    trunk: bool  # SigLIP, fusion and the LLM ran (plan.needs_trunk)
    skipped: tuple[int, ...]  # LLM layers run as identity in this call
    importance: tuple[float, ...] | None  # importance_l, l = 0..L-1, measured in this call
    skip_set: tuple[int, ...]  # the skip set after this call, applied on the next "skip" calls
    head_cached: bool  # a stored head output is held after this call


class FlashUGenVelocity:
    """Stateful VelocityFn of one generation: call it with steps 0, 1, ..., num_calls - 1 in order.

    State: the skip set (from the last measuring call) and the stored head output (M, L, D).
    ``plans`` and ``guidance_schedule`` are the host-side schedule; ``records`` one GenCallRecord per call.
    """

    def __init__(
        self,
        model: Showo2,
        batch: GenBatch,
        config: FlashUConfig,
        layout: FFNLayout | None,
        num_calls: int,
        guidance: float,
    ) -> None:
        if config.task != "gen":
            raise ValueError(f"FlashUConfig.task={config.task!r} is invalid here: FlashUGenVelocity needs 'gen'")
        self.model, self.batch, self.config = model, batch, config
        self.plans: list[StepPlan] = gen_schedule(config, num_calls, guidance)
        self.ffn_ranges = ffn_ranges_per_layer(model, config, layout, "gen")
        self.num_skipped = config.num_skipped_layers(model.config.num_layers)
        seq_len = batch.tokens.shape[1]
        dtype = model.showo.model.embed_tokens.weight.dtype
        self.cos, self.sin, self.head_cos, self.head_sin = model.rope(seq_len, dtype, batch.tokens.device)
        self.in_slot = in_slot_mask(batch.offsets, seq_len, model.config.image_slot_len)  # bool (M, L, 1)
        self.reset()

    @property
    def guidance_schedule(self) -> list[float]:
        """g_s for s = 1..S: the sampler's per-call guidance list."""
        return [p.guidance for p in self.plans]

    def reset(self) -> None:
        """Forget the skip set, the head cache and the records (before a new image)."""
        self.skip_set: tuple[int, ...] = ()
        self.head_cache: Tensor | None = None  # (M, L, D), output of the 10 head blocks
        self.records: list[GenCallRecord] = []

    def trunk(self, x: Tensor, c: Tensor, plan: StepPlan, skipped: tuple[int, ...]) -> tuple[Tensor, Tensor | None]:
        """SigLIP, fusion, embeddings and the LLM layers of one call.

        x: (M, C, h, w) state; c: (M, D) time embeddings -> post-norm hidden (M, L, H), importance (L,) fp32
        on a "measure" call, else None. A skipped layer is the identity; with pruning each layer's FFN runs
        its "gen" neuron ranges. Importance uses each layer's own output, before the final norm.
        """
        model, batch = self.model, self.batch
        h = model.embed_inputs(batch.tokens, batch.offsets, model.image_embeds(x), c)
        measure, slot_len = plan.layers == "measure", model.config.image_slot_len
        importance = []
        for i, layer in enumerate(model.showo.model.layers):
            if i in skipped:
                continue
            out = layer(h, self.cos, self.sin, batch.mask, ffn_ranges=self.ffn_ranges[i] if plan.ffn_pruned else None)
            if measure:  # over the image block of ALL rows, cond and null alike
                importance.append(
                    layer_importance(image_block(h, batch.offsets, slot_len), image_block(out, batch.offsets, slot_len))
                )
            h = out
        return model.showo.model.norm(h), torch.stack(importance) if measure else None

    def __call__(self, x: Tensor, t: Tensor, step: int) -> Tensor:
        """x: (M, C, h, w) fp32 state; t: (M,) -> velocity (M, C, h, w) in the model dtype (before CFG)."""
        if step != len(self.records) or step >= len(self.plans):
            raise RuntimeError(
                f"FlashUGenVelocity expects call {len(self.records)} of {len(self.plans)}, got step {step}; "
                "reset() before a new image"
            )
        plan, model = self.plans[step], self.model
        c = model.time_embeds(t)
        skipped = self.skip_set if plan.layers == "skip" else ()
        importance = None
        if plan.needs_trunk:  # a plain reuse call never reads x: its trunk would be dead code
            hidden, measured = self.trunk(x, c, plan, skipped)
            if measured is not None:
                importance = tuple(measured.tolist())  # the one host read of a measuring call
                self.skip_set = choose_skip_set(importance, self.num_skipped)
        if plan.head == "reuse":
            if self.head_cache is None:
                raise RuntimeError(f"call {plan.call} reuses the head output but none is stored")
            head_out = self.head_cache
        else:
            head_out = model.head_blocks(hidden, c, self.in_slot, self.head_cos, self.head_sin, self.batch.mask)
            # "store" keeps it; "compute" drops any stored one (after the first store, only the full phase computes)
            self.head_cache = head_out if plan.head == "store" else None
        v_tokens = model.diffusion_head_b(head_out, c, self.in_slot)  # FinalLayer with the CURRENT t
        v = model.extract_velocity(v_tokens, self.batch.offsets, tuple(x.shape[-2:]))
        self.records.append(
            GenCallRecord(
                call=plan.call,
                guidance=plan.guidance,
                ffn_pruned=plan.ffn_pruned,
                layers=plan.layers,
                head=plan.head,
                trunk=plan.needs_trunk,
                skipped=skipped,
                importance=importance,
                skip_set=self.skip_set,
                head_cached=self.head_cache is not None,
            )
        )
        return v


class FlashUGenResult(NamedTuple):
    latents: Tensor  # (B, C, h, w) fp32
    records: list[GenCallRecord]  # one per call, s = 1..S


@torch.no_grad()
def generate_images_flashu(
    model: Showo2,
    prompts: Sequence[str | Sequence[int]],
    config: FlashUConfig,
    layout: FFNLayout | None,
    tokenizer: TextTokenizer | None = None,
    baseline_steps: int = 50,
    guidance: float = 10.0,
    seed: int = 0,
    progress: bool = False,
    seeds: Sequence[int] | None = None,
) -> FlashUGenResult:
    """FlashU text-to-image on the shorter grid: ``config.num_points(baseline_steps)`` points (50 -> 35, 34 calls).

    The plain pipeline (``generate_images``: same batch, noise and Euler/CFG loop) with the FlashU velocity and
    the per-call guidance g_s of the plans; ``guidance`` is g, the scale of the last calls (0 disables CFG;
    ``config.guidance_schedule``). ``layout`` is required when ``config.ffn_prune_ratio > 0`` and the model's
    FFNs must be permuted by it. ``seeds``: one noise seed per prompt, as in ``generate_images``. The skip set is
    measured over the whole batch, so unlike the eager baseline a FlashU image also depends on the prompts that
    share its batch.
    """
    ids = encode_prompts(model, prompts, tokenizer)
    check_guidance(guidance, per_call=False)
    check_baseline_steps(baseline_steps, config)
    guided = guidance != 0
    device = next(model.parameters()).device
    batch = build_gen_batch(model.config, ids, guided=guided).to(device)
    num_points = config.num_points(baseline_steps)
    velocity = FlashUGenVelocity(model, batch, config, layout, num_points - 1, guidance)
    scales = velocity.guidance_schedule if guided else 0.0
    latents = generate_images(
        model, ids, steps=num_points, guidance=scales, seed=seed, progress=progress, velocity=velocity, seeds=seeds
    )
    return FlashUGenResult(latents, velocity.records)
