"""Rows "flashu-eager" for ``demo`` and ``bench``: the eager FlashU twins (flashu_fx.flashu_gen / flashu_und).

Each row prepares, untimed: per-task FFN scores, the permuted FFN layout, and (gen) the batch, noise and grid
of the shorter FlashU grid. The permutation is exact (the full FFN computes the same function), so it is
applied to the context's model in place, once per context and task, and the FlashU rows (eager and compiled)
share it: no model copy, so each row's peak memory is its own. Scores come from a Wanda calibration when
``flashu_fx.calibration`` is importable (gen: the first prompt, a few denoising steps; und: the request's
own image and question), else from random scores; the row's note says which. A context may fix both up front:
``ctx.flashu_configs[task]`` replaces the paper's settings and ``ctx.flashu_layouts[task]`` the calibration (the
demo does so with the testbed's shipped calibrations).
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from flashu_fx.ffn_layout import FFNLayout, build_ffn_layout, permute_ffn_weights, top_k_mask
from flashu_fx.flashu_config import FlashUConfig
from flashu_fx.flashu_gen import FlashUGenVelocity
from flashu_fx.flashu_und import FlashUAnswer, answer_question_flashu
from flashu_fx.model import Showo2
from flashu_fx.sampler import euler_sample
from harness.rows import GenContext, PreparedRow, UndContext, gen_inputs, register_row

CALIBRATION_STEPS = 4  # gen calibration: grid points of the one calibration generation (few: it is untimed)


def random_ffn_scores(model: Showo2, seed: int = 0) -> torch.Tensor:
    """(layers, I) uniform scores: a layout for timing and compile checks (which neurons are kept does not
    change either)."""
    cfg = model.config
    return torch.rand(cfg.num_layers, cfg.intermediate_size, generator=torch.Generator().manual_seed(seed))


def permute_for(model: Showo2, config: FlashUConfig, scores: torch.Tensor) -> FFNLayout:
    """Keep each layer's top ``config.kept_ffn_width`` neurons by ``scores``: permute ``model``'s FFNs in place
    (exact) and return the one-task layout."""
    keep = top_k_mask(scores, config.kept_ffn_width(model.config.intermediate_size))
    layout = build_ffn_layout({config.task: keep})
    permute_ffn_weights(model, layout.order)
    return layout


def prepare_flashu(ctx: GenContext | UndContext, config: FlashUConfig) -> tuple[Showo2, FFNLayout | None, str]:
    """``ctx.model`` with its FFNs permuted for ``config.task`` (in place, once per context and task: later
    calls return the same layout); returns (model, layout, how scored)."""
    model = ctx.model
    if config.ffn_prune_ratio == 0:
        return model, None, "no FFN pruning"
    if config.task not in ctx.flashu_layouts:
        sample = ctx.prompts[0] if config.task == "gen" else (ctx.latents, ctx.question)
        seed = getattr(ctx, "seed", 0)
        try:
            from flashu_fx.calibration import calibrate
        except ImportError:
            calibrate = None
        if calibrate is not None:
            kwargs = {"steps": CALIBRATION_STEPS, "seed": seed} if config.task == "gen" else {}
            scores = calibrate(model, config.task, [sample], config, progress=False, tokenizer=ctx.tokenizer,
                               **kwargs).scores
            how = "Wanda calibration, 1 sample"
        else:
            scores = random_ffn_scores(model, seed)
            how = "random FFN scores (flashu_fx.calibration not available)"
        print(f"flashu {config.task}: {how}", file=sys.stderr)
        ctx.flashu_layouts[config.task] = (permute_for(model, config, scores), how)
    layout, how = ctx.flashu_layouts[config.task]
    return model, layout, how


def flashu_config_for(ctx: GenContext | UndContext, task: str) -> FlashUConfig:
    """The context's FlashU settings for ``task``, else the paper's defaults."""
    return ctx.flashu_configs.get(task) or FlashUConfig.for_task(task)


def flashu_eager_gen(ctx: GenContext) -> PreparedRow:
    """FlashU generation (paper Table 7 defaults) on ``config.num_points(ctx.steps)`` grid points."""
    config = flashu_config_for(ctx, "gen")
    model, layout, how = prepare_flashu(ctx, config)
    points = config.num_points(ctx.steps)
    batch, noise, grid = gen_inputs(dataclasses.replace(ctx, model=model, steps=points))
    velocity = FlashUGenVelocity(model, batch, config, layout, points - 1, ctx.guidance)
    scales = velocity.guidance_schedule if ctx.guidance != 0 else None

    def run() -> torch.Tensor:
        velocity.reset()
        return euler_sample(velocity, noise, grid, scales, ctx.progress)

    reused = sum(p.head == "reuse" for p in velocity.plans)
    return PreparedRow(run=run, count=lambda _: points - 1, note=f"{points - 1} calls ({reused} head reuses); {how}")


def flashu_eager_und(ctx: UndContext) -> PreparedRow:
    """FlashU understanding (paper Table 8 defaults): V-norm token pruning, pruned FFN, layer skipping."""
    config = flashu_config_for(ctx, "und")
    model, layout, how = prepare_flashu(ctx, config)

    def run() -> FlashUAnswer:
        return answer_question_flashu(
            model,
            ctx.latents,
            ctx.question,
            config,
            layout,
            ctx.tokenizer,
            max_new_tokens=ctx.max_new_tokens,
            stop_at_eos=ctx.stop_at_eos,
        )

    n = ctx.model.config.num_image_tokens
    note = f"keeps {config.kept_tokens(n)}/{n} image tokens after layer {config.token_prune_layer}; {how}"
    return PreparedRow(run=run, count=lambda answer: len(answer.ids), note=note)


register_row("gen", "flashu-eager", flashu_eager_gen)
register_row("und", "flashu-eager", flashu_eager_und)
