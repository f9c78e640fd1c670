"""``python -m harness analyze``: the paper's analyses of what FlashU rests on, on the trained testbed.

    python -m harness analyze                                     # the shipped testbed, every analysis
    python -m harness analyze --weights runs/testbed --steps 20 --out runs/analyze
    python -m harness analyze --gen calib/gen --und calib/und     # FFN specialisation of two calibrations only

- FFN neuron specialisation (paper Fig. 1): per layer, of each task's top-50% neurons (by calibration score), how
  many are generation-only, understanding-only or shared (``specialization.json``, ``specialization.png``);
- layer input/output cosine similarity (Fig. 2 and 4): generation over denoising calls, understanding over the
  prefill and decode steps (``layer_similarity.png``);
- V-norm of image tokens against the attention they receive (Fig. 5), scatter and correlation per layer
  (``vnorm_attention.png``);
- the share of attention on image tokens per layer for each task (``image_attention.png``).
The model analyses run on the testbed's weights (``--weights``, default the shipped directory) with held-out prompts
and questions; the calibrations default to the testbed's. Given ``--gen`` and ``--und`` without ``--weights``, only
the specialisation runs (calibrations alone, any model). Numbers go to ``analysis.json``; charts need matplotlib
(the ``[plots]`` extra).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flashu_fx.calibration import Calibration, specialization
from flashu_fx.testbed.checkpoint import SHIPPED_DIR, Testbed, flashu_config, load_testbed
from harness.arguments import command_parser, display_path

PARTS = (("gen_only", "generation only", "tab:orange"), ("und_only", "understanding only", "tab:blue"))
PARTS += (("both", "both", "tab:green"),)


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("python -m harness analyze", __doc__)
    p.add_argument("--weights", type=Path, default=None,
                   help="testbed directory (default: the shipped one, unless --gen and --und are both given)")
    p.add_argument("--gen", help="generation calibration path stem (default: the testbed's calibration_gen)")
    p.add_argument("--und", help="understanding calibration path stem (default: the testbed's calibration_und)")
    p.add_argument("--top-fraction", type=float, default=0.5, help="share of each task's highest-scored neurons")
    p.add_argument("--prompts", type=int, default=4, help="held-out prompts generated under the probes")
    p.add_argument("--questions", type=int, default=8, help="held-out questions answered under the probes")
    p.add_argument("--steps", type=int, default=None, help="grid points of the generation (default: the testbed's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the testbed's)")
    p.add_argument("--new-tokens", type=int, default=8, help="decode steps per question (no stop at eos)")
    p.add_argument("--vnorm-layer", type=int, default=None,
                   help="layer of the V-norm scatter (default: FlashU's token_prune_layer)")
    p.add_argument("--seed", type=int, default=0, help="held-out set and noise seed")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto: bf16 on CUDA, else fp32")
    p.add_argument("--out", default="runs/analyze", help="output directory")
    return p


def format_table(report: dict[str, Any]) -> str:
    k = report["top_k"]
    lines = [
        f"top {report['top_fraction']:.0%} = {k} of {report['intermediate_size']} neurons per layer and task",
        f"{'layer':>5} {'gen-only':>9} {'und-only':>9} {'both':>7} {'neither':>8} {'shared':>7}",
    ]
    for row in [*report["layers"], {"layer": "all", **report["totals"]}]:
        scale = k if row["layer"] != "all" else k * len(report["layers"])
        lines.append(
            f"{row['layer']:>5} {row['gen_only']:>9} {row['und_only']:>9} {row['both']:>7} {row['neither']:>8} "
            f"{row['both'] / scale:>7.1%}"
        )
    return "\n".join(lines)


def save_chart(report: dict[str, Any], path: Path) -> None:
    """Stacked bars per layer: gen-only, und-only, both. Uses a bare Figure (no pyplot global state)."""
    from matplotlib.figure import Figure

    layers = [row["layer"] for row in report["layers"]]
    fig = Figure(figsize=(max(7.0, 2.5 + 0.3 * len(layers)), 4.0))
    ax = fig.add_subplot()
    bottom = [0] * len(layers)
    for key, label, color in PARTS:
        values = [row[key] for row in report["layers"]]
        ax.bar(layers, values, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xticks(layers)
    ax.set_xlabel("LLM layer")
    ax.set_ylabel(f"neurons in a task's top {report['top_fraction']:.0%}")
    ax.set_title("FFN neuron specialisation: generation vs understanding")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def load_calibrations(args: argparse.Namespace, tb: Testbed | None) -> tuple[Calibration, Calibration]:
    """--gen / --und, else the testbed's own (checked against its weights when it is loaded)."""
    model = None if tb is None else tb.model
    found = []
    for task in ("gen", "und"):
        stem = getattr(args, task) or (None if tb is None else tb.path / f"calibration_{task}")
        if stem is None:
            raise SystemExit(f"error: --{task} is needed when no testbed is loaded (--weights)")
        calib = Calibration.load(stem, model)
        if calib.task != task:
            print(f"warning: --{task} {stem} is a {calib.task!r} calibration")
        found.append(calib)
    return found[0], found[1]


def run_specialization(gen: Calibration, und: Calibration, top_fraction: float, out: Path,
                       plots: bool) -> dict[str, Any]:
    report = specialization(gen, und, top_fraction)
    print(f"gen: {gen.method}, {gen.samples_used} samples; und: {und.method}, {und.samples_used} samples")
    print(format_table(report))
    (out / "specialization.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'specialization.json'}")
    if plots:
        save_chart(report, out / "specialization.png")
        print(f"wrote {out / 'specialization.png'}")
    return report


def object_tokens(images: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """uint8 scenes (N, H, W, 3) on a black background -> bool (N, gh * gw): which image tokens (row-major, as the
    model lays them out) cover any object pixel."""
    n, h, w, _ = images.shape
    gh, gw = grid
    lit = images.reshape(n, gh, h // gh, gw, w // gw, 3).max(axis=(2, 4, 5)) > 0
    return lit.reshape(n, gh * gw)


def run_model_analyses(args: argparse.Namespace, tb: Testbed, out: Path, plots: bool) -> dict[str, Any]:
    """The layer-similarity, attention-share and V-norm analyses on the testbed's weights."""
    from flashu_fx.testbed import world
    from harness.llm_analysis import analyze_generation, analyze_understanding, pruning_losses
    from harness.quality_eval import scene_latents

    steps, guidance = args.steps or tb.steps, args.guidance or tb.guidance
    layer = flashu_config("und").token_prune_layer if args.vnorm_layer is None else args.vnorm_layer
    prompts = world.heldout_gen_prompts(args.prompts, seed=args.seed)
    print(f"generation: {len(prompts)} held-out prompts, {steps} grid points, guidance {guidance}")
    gen = analyze_generation(tb.model, tb.tokenizer, [p.caption for p in prompts], steps, guidance, args.seed)
    items = world.heldout_questions(args.questions, seed=args.seed)
    device, dtype = next(tb.model.parameters()).device, next(tb.model.parameters()).dtype
    print(f"understanding: {len(items)} held-out questions, {args.new_tokens} decode steps each")
    scenes = world.render_batch([it.scene for it in items])  # rendered once: the latents and the object tokens
    und = analyze_understanding(tb.model, tb.tokenizer, scene_latents(scenes, device, dtype),
                                [it.question for it in items], args.new_tokens, layer)
    print("layer:                 " + " ".join(f"{i:>5}" for i in range(gen.cosine.shape[1])))
    for label, values in (("gen cos(in, out)", gen.cosine.mean(0)), ("und cos(in, out)", und.cosine.mean(0)),
                          ("gen image attention", gen.image_share.mean(0)),
                          ("und image attention", und.image_share.mean(0)), ("und V-norm Spearman", und.spearman)):
        print(f"{label:<22} " + " ".join(f"{v:5.2f}" for v in values))
    ratio = flashu_config("und").token_prune_ratio
    objects = object_tokens(scenes, tb.model.config.image_grid)
    n = objects.shape[1]
    losses = [pruning_losses(und.vnorm.reshape(-1, n), und.attention.reshape(-1, n), objects, r)
              for r in sorted({0.1, 0.25, ratio})]
    for loss in losses:
        print(f"V-norm pruning at layer {layer}, ratio {loss['ratio']}: drops {loss['tokens_dropped']:.0%} of the "
              f"image tokens, {loss['object_tokens_dropped']:.0%} of the object tokens and "
              f"{loss['attention_dropped']:.0%} of the attention the text pays to the image")
    report = {
        "steps": steps, "guidance": guidance, "prompts": [p.caption for p in prompts],
        "questions": [it.question for it in items], "new_tokens": args.new_tokens,
        "gen": {"cosine": gen.cosine.tolist(), "image_attention_share": gen.image_share.tolist()},
        "und": {"cosine": und.cosine.tolist(), "image_attention_share": und.image_share.tolist(),
                "vnorm_layer": layer, "vnorm_attention_pearson": und.pearson,
                "vnorm_attention_spearman": und.spearman, "pruning_losses": losses},
    }
    if plots:
        from harness.analysis_charts import save_image_attention, save_layer_similarity, save_vnorm_attention

        for path in (save_layer_similarity(gen, und, out / "layer_similarity.png"),
                     save_vnorm_attention(und, out / "vnorm_attention.png"),
                     save_image_attention(gen, und, out / "image_attention.png")):
            print(f"wrote {path}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, low in (("prompts", 1), ("questions", 1), ("steps", 2), ("new_tokens", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    weights = args.weights
    if weights is None and not (args.gen and args.und):
        weights = SHIPPED_DIR
    tb = None
    if weights is not None:
        from harness.devices import DTYPES, resolve_device

        device = resolve_device(args.device)
        dtype = DTYPES[args.dtype if args.dtype != "auto" else "bf16" if device.type == "cuda" else "fp32"]
        try:
            tb = load_testbed(weights, dtype=dtype, device=device)
        except FileNotFoundError as err:
            parser.error(f"--weights {weights}: {err}")
        if args.vnorm_layer is not None and not 0 <= args.vnorm_layer < tb.model.config.num_layers:
            parser.error(f"--vnorm-layer {args.vnorm_layer} is invalid: allowed 0..{tb.model.config.num_layers - 1}")
    gen, und = load_calibrations(args, tb)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib  # noqa: F401

        plots = True
    except ImportError:
        print("matplotlib is not installed: no charts (pip install -e '.[plots]')")
        plots = False
    report: dict[str, Any] = {"specialization": run_specialization(gen, und, args.top_fraction, out, plots)}
    if tb is not None:
        with torch.no_grad():
            report.update(weights=display_path(tb.path), **run_model_analyses(args, tb, out, plots))
        (out / "analysis.json").write_text(json.dumps(report, indent=1))
        print(f"wrote {out / 'analysis.json'}")
    return 0
