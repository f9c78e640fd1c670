"""Rows "compiled-exact" and "compiled-flashu" for ``bench`` and ``demo``: ``torch.compile(model,
backend=flashu_backend(...))`` driven through the backend's step protocol.

Preparing a row (untimed) compiles it with one warm-up image and records the first-compile time, the
number of graph captures, and the final-latent cosine against its eager twin from the same noise:
compiled-exact against the eager baseline, compiled-flashu against eager FlashU on the same pruned copy.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from flashu_fx.compiled import BACKEND_OPTIONS, compiled_batch, flashu_backend, lean_guard_options, stepped_velocity
from flashu_fx.compiled.part_compiler import check_inductor_options
from flashu_fx.flashu_config import FlashUConfig
from flashu_fx.flashu_gen import FlashUGenVelocity
from flashu_fx.sampler import euler_sample
from flashu_fx.t2i import eager_velocity
from harness.flashu_rows import prepare_flashu
from harness.rows import GenContext, PreparedRow, gen_inputs, parse_option, register_row, timed

ROW_OWNED_OPTIONS = ("task", "config", "layout", "model_config")  # each compiled row sets these itself


def backend_overrides(options: dict | None) -> dict:
    """Validated ``flashu_backend`` keyword arguments for a row variant (``compiled-flashu[tune_decode=off]``);
    ``inductor.NAME=value`` items go into ``inductor_options`` (``compiled-flashu[inductor.max_autotune_gemm=on]``)."""
    options = dict(options or {})
    inductor = {k.removeprefix("inductor."): options.pop(k) for k in list(options) if k.startswith("inductor.")}
    if inductor:
        options["inductor_options"] = check_inductor_options({**options.get("inductor_options", {}), **inductor})
    allowed = [k for k in BACKEND_OPTIONS if k not in ROW_OWNED_OPTIONS]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown backend option(s) {unknown}; flashu_backend takes {allowed} here, and "
                         "inductor.NAME=value")
    return options


def add_backend_option_argument(parser: argparse.ArgumentParser) -> None:
    """``--option KEY=VALUE`` (repeatable): a ``flashu_backend`` option, as in row variants."""
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a flashu_backend option (repeatable), e.g. merge_projections=off or "
                        "inductor.max_autotune_gemm=on")


def parsed_backend_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """The validated options of ``add_backend_option_argument``; a bad one exits through ``parser.error``."""
    try:
        return backend_overrides(dict(parse_option(item) for item in args.option))
    except ValueError as err:
        parser.error(str(err))


def options_note(options: dict) -> str:
    return "".join(f"; {k}={v}" for k, v in options.items())


def latent_cosine(a: Tensor, b: Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def compiled_gen_row(config: FlashUConfig | None, options: dict | None = None):
    """The row's function; ``options``: extra ``flashu_backend`` keyword arguments (a row variant)."""
    overrides = backend_overrides(options)

    def row(ctx: GenContext) -> PreparedRow:
        row_config = None if config is None else ctx.flashu_configs.get("gen", config)
        if row_config is None:
            model, layout, how = ctx.model, None, "exact optimizations only"
            points = ctx.steps
        else:
            model, layout, how = prepare_flashu(ctx, row_config)
            points = row_config.num_points(ctx.steps)
        batch, noise, grid = gen_inputs(dataclasses.replace(ctx, model=model, steps=points))
        backend = flashu_backend("gen", row_config, layout, **overrides)
        # Each torch.compile of Showo2.forward with a new backend adds a Dynamo cache entry; rows (and their
        # variants) run one after another, so start each from a clean cache, far from the recompile limit.
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend, options=lean_guard_options())
        velocity = stepped_velocity(compiled, backend, compiled_batch(model.config, batch))

        def run() -> Tensor:
            plans = backend.begin_image(points - 1, ctx.guidance)
            return euler_sample(velocity, noise, grid, [p.guidance for p in plans], ctx.progress)

        out, first = timed(run, noise.device)
        with torch.no_grad():
            if row_config is None:
                twin = euler_sample(eager_velocity(model, batch, return_logits=False), noise, grid, ctx.guidance)
            else:
                eager = FlashUGenVelocity(model, batch, row_config, layout, points - 1, ctx.guidance)
                twin = euler_sample(eager, noise, grid, eager.guidance_schedule)
        cos = latent_cosine(out, twin)
        note = (
            f"{points - 1} calls; first image (compile) {first:.1f} s, parts compiled in "
            f"{sum(backend.part_compile_seconds.values()):.1f} s; {backend.compiles} capture(s); "
            f"cos vs eager {'baseline' if config is None else 'FlashU'} {cos:.5f}; {how}{options_note(overrides)}"
        )
        return PreparedRow(run=run, count=lambda _: points - 1, note=note)

    return row


register_row("gen", "compiled-exact", compiled_gen_row(None),
             variants=lambda options: compiled_gen_row(None, options))
register_row("gen", "compiled-flashu", compiled_gen_row(FlashUConfig.for_task("gen")),
             variants=lambda options: compiled_gen_row(FlashUConfig.for_task("gen"), options))
