"""``python -m harness demo``: text-to-image for two prompts and one question about the first picture, once per
registered row (eager, eager FlashU, compiled exact, compiled FlashU), with a table and a captioned grid.

    python -m harness demo                                        # the shipped trained testbed, CPU
    python -m harness demo --preset tiny                          # a tiny random model, seconds
    python -m harness demo --weights ckpt/show-o2-1.5B --tokenizer ckpt/qwen2.5-1.5b-instruct \
        --vae ckpt/wan2.1-vae-diffusers --device cuda

The testbed draws and reads its world of coloured shapes: the prompts and the question come from that world, its
shipped calibrations drive the FlashU rows and its exact codec decodes the pictures. Without its weights in the
checkout the demo says so and runs the tiny random model, whose pictures are structured noise (the latent preview);
with ``--weights`` (and ``--vae``, when diffusers is installed) they are real pictures. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from flashu_fx.config import PRESETS, get_config
from flashu_fx.flashu_config import FlashUConfig
from flashu_fx.loading import from_pretrained
from flashu_fx.model import Showo2
from flashu_fx.testbed import world
from flashu_fx.testbed.scorer import judge_picture, judgement_line
from flashu_fx.testbed.world import GenPrompt
from flashu_fx.tokenizer import TextTokenizer, get_tokenizer
from flashu_fx.vae import WanLatentCodec, diffusers_available
from harness.arguments import command_parser, existing_directory
from harness.devices import DTYPES, auto_threads, intra_op_threads, resolve_device
from harness.grids import captioned_grid
from harness.images import image_grid, latents_to_images, write_png
from harness.random_model import build_random_model
from harness.rows import (
    BASELINES,
    TASKS,
    GenContext,
    UndContext,
    fit_prompt,
    load_optional_rows,
    parse_variant,
    rows_for,
    select_rows,
    split_row_names,
    summarize,
    time_row,
)
from harness.runner import OptionError, is_testbed_dir, load_checkpoint, shipped_flashu, shipped_testbed_present
from harness.tables import format_table

PROMPTS = (
    "A red fox sitting in a snowy forest at dawn.",
    "A bowl of ramen with a soft-boiled egg, top view.",
)
QUESTION = "What is in this image?"
# The testbed's world: its words only.
TESTBED_PROMPTS = ("a photo of a red circle", "a photo of a blue square and a yellow triangle")
TESTBED_QUESTION = "what color is the circle"
DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_NEW_TOKENS = 50, 7.5, 32  # models other than the testbed (upstream's demo)


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("python -m harness demo", __doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a random model of these shapes (default: the shipped testbed, else tiny)")
    p.add_argument("--weights", type=existing_directory, default=None,
                   help="local checkpoint dir, a testbed or Show-o2 weights (overrides --preset)")
    p.add_argument("--tokenizer", type=existing_directory, default=None,
                   help="local Qwen2.5 tokenizer dir (default: bytes)")
    p.add_argument("--vae", type=existing_directory, default=None,
                   help="local diffusers-format Wan2.1 VAE dir (the folder with its config.json)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu", help="auto: cuda when available")
    p.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto", help="auto: bf16 on CUDA, else fp32")
    p.add_argument("--steps", type=int, default=None, help="grid points, model calls = steps - 1 (default: the "
                   f"testbed's, else {DEFAULT_STEPS})")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the testbed's, else "
                   f"{DEFAULT_GUIDANCE}, upstream's demo)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="understanding: most tokens to generate (default: "
                   f"8 for the testbed, else {DEFAULT_NEW_TOKENS})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: 1 for tiny models on CPU)")
    p.add_argument(
        "--rows",
        type=split_row_names,
        default=None,
        help="comma-separated row names of either task (default: every registered row; baselines always run)",
    )
    return p


@dataclass
class DemoModel:
    """The model the demo runs and what goes with it: its text, its pictures, its defaults, its FlashU settings."""

    model: Showo2
    tokenizer: TextTokenizer
    to_images: Callable[[Tensor], Tensor]  # latents -> uint8 (B, H, W, 3)
    images_by: str  # how pictures are made: "testbed codec" | "VAE" | "latent preview"
    source: str
    prompts: tuple[str, ...] = PROMPTS
    question: str = QUESTION
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    max_new_tokens: int = DEFAULT_NEW_TOKENS
    flashu_layouts: dict = field(default_factory=dict)  # task -> (layout, how scored), as in GenContext
    flashu_configs: dict = field(default_factory=dict)  # task -> FlashUConfig
    world_prompts: tuple[GenPrompt | None, ...] | None = None  # a testbed's: the prompts its scorer judges


def load_testbed_demo(path: Path | None, args: argparse.Namespace, device: torch.device,
                      dtype: torch.dtype) -> DemoModel:
    """A testbed (``path`` None: the shipped one) with its world's prompts, its codec and its shipped calibrations."""
    ckpt = load_checkpoint(path, args.tokenizer, args.vae, device, dtype)
    shipped = shipped_flashu(ckpt, TASKS)  # one permutation for both tasks' shipped scores
    return DemoModel(
        ckpt.model, ckpt.tokenizer, ckpt.images.decode, "testbed codec", f"testbed {ckpt.path}",
        TESTBED_PROMPTS, TESTBED_QUESTION, ckpt.steps, ckpt.guidance, ckpt.max_new_tokens,
        flashu_layouts={task: (s.layout, s.how) for task, s in shipped.items()},
        flashu_configs={task: shipped[task].config if task in shipped else ckpt.flashu_config(task) for task in TASKS},
        world_prompts=tuple(world.parse_caption(p) for p in TESTBED_PROMPTS),
    )


def load_demo_model(args: argparse.Namespace, parser: argparse.ArgumentParser, device: torch.device,
                    dtype: torch.dtype) -> DemoModel:
    """``--weights`` (a testbed or Show-o2 weights), else ``--preset`` (random), else the shipped testbed when the
    checkout has it, else the tiny random model."""
    testbed = args.weights is not None and is_testbed_dir(args.weights)
    if args.weights is None and args.preset is None:
        testbed = shipped_testbed_present()
        if not testbed:
            print("demo: the shipped testbed weights (flashu_fx/testbed/weights/) are not in this checkout; running "
                  "the tiny random model instead, whose pictures are structured noise", file=sys.stderr)
    if testbed:
        try:
            return load_testbed_demo(args.weights, args, device, dtype)
        except OptionError as err:
            parser.error(str(err))
    if args.weights is not None:
        model, source = from_pretrained(args.weights, dtype=dtype, device=device), f"weights {args.weights}"
    else:
        preset = args.preset or "tiny"
        model, source = build_random_model(get_config(preset), device, dtype, args.seed), f"random {preset}"
    vae = load_vae(args.vae, device)
    return DemoModel(model, get_tokenizer(model.config, args.tokenizer), lambda x: latents_to_images(x, vae),
                     "VAE" if vae is not None else "latent preview", source)


def load_vae(path: Path | None, device: torch.device) -> WanLatentCodec | None:
    """The VAE codec of ``--vae``: fp32 weights (bf16 autocast on CUDA), or None for the latent preview."""
    if path is None:
        return None
    if not diffusers_available():
        print("warning: --vae needs diffusers>=0.33 (the [vae] extra); writing the latent preview", file=sys.stderr)
        return None
    return WanLatentCodec.from_pretrained(path, device=device)


def pick_rows(task: str, names: list[str] | None, parser: argparse.ArgumentParser) -> list[str] | None:
    """The names of ``task`` among ``names`` (None = all; variants ``row[k=v]`` go with their row); a name
    registered for neither task is an error."""
    if names is None:
        return None

    def base(name: str) -> str:
        variant = parse_variant(name)
        return name if variant is None else variant[0]

    known = {n for t in TASKS for n in rows_for(t)}
    unknown = sorted(n for n in names if base(n) not in known)
    if unknown:
        parser.error(f"unknown row(s) {unknown}; registered: {sorted(known)}")
    return [n for n in names if base(n) in rows_for(task)]


def answer_words(answer) -> str:
    """An answer for the table: its words, and how many tokens made them."""
    return f"{answer.text.strip()!r} ({len(answer.ids)} tokens)"


def write_demo_grid(out: Path, pictures: dict[str, Tensor], demo: DemoModel,
                    judged: dict[str, list[dict]] | None = None) -> Path | None:
    """``demo.png``: one row per gen row, each picture under its prompt (and the scorer's ``judged`` line, on a
    testbed); None without matplotlib."""
    rows = [(name, list(images.numpy())) for name, images in pictures.items()]
    notes = None if judged is None else [[judgement_line(j) for j in judged[name]] for name in pictures]
    title = f"demo: {demo.model.config.name}, pictures by the {demo.images_by}"
    try:
        return captioned_grid(rows, list(demo.prompts), out / "demo.png", title=title, notes=notes)
    except ImportError:  # matplotlib, imported when drawing
        print("matplotlib is not installed: no demo.png (pip install 'flashu-fx[plots]')", file=sys.stderr)
        return None


def run_rows(args, rows: dict, demo: DemoModel) -> tuple[list[list[str]], dict]:
    """t2i for the demo's prompts with every gen row (one PNG each, and the grid of all), then its question about
    the first picture of the baseline."""
    model, tok = demo.model, demo.tokenizer
    table, report = [], {"model": model.config.name, "source": demo.source, "prompts": list(demo.prompts),
                         "question": demo.question, "device": str(next(model.parameters()).device), "rows": []}
    prompts = [fit_prompt(model.config, tok.encode(p), f"demo prompt {i}") for i, p in enumerate(demo.prompts)]
    gen_ctx = GenContext(model, prompts, args.steps, args.guidance, args.seed, tok, True,
                         flashu_layouts=dict(demo.flashu_layouts), flashu_configs=demo.flashu_configs)
    gen_out, pictures, judged = {}, {}, {}
    for name, fn in rows["gen"].items():
        r = time_row("gen", name, fn, gen_ctx, warmup=0, repeats=1)
        gen_out[name] = r.output
        pictures[name] = demo.to_images(r.output)
        stem = re.sub(r"[^\w.-]+", "_", name).strip("_")  # a variant's brackets and '=' stay out of file names
        png = write_png(args.out / f"t2i_{stem}.png", image_grid(pictures[name]))
        summary = summarize("gen", r.output)
        row = {"task": "gen", "row": name, "seconds": r.seconds, "count": r.count, "png": str(png)}
        if demo.world_prompts is not None:  # the testbed's scorer on each picture
            judged[name] = [judge_picture(prompt, image) for prompt, image in
                            zip(demo.world_prompts, pictures[name].numpy(), strict=True)]
            row["judged"] = judged[name]
            summary = f"{sum(bool(j['right']) for j in judged[name])}/{len(judged[name])} right; {summary}"
        table.append(["t2i", name, f"{r.count} calls", f"{r.seconds:.2f}", summary])
        report["rows"].append(row)
    grid = write_demo_grid(args.out, pictures, demo, judged if demo.world_prompts is not None else None)
    report["grid"] = None if grid is None else str(grid)
    # The question is about the first generated image (its latents are the VAE's normalised latents).
    latents = gen_out[BASELINES["gen"]][:1]
    und_ctx = UndContext(model, latents, demo.question, tok, args.max_new_tokens, stop_at_eos=True, progress=True,
                         flashu_layouts=dict(demo.flashu_layouts), flashu_configs=demo.flashu_configs)
    for name, fn in rows["und"].items():
        r = time_row("und", name, fn, und_ctx, warmup=0, repeats=1)
        table.append(["und", name, f"{r.count} tokens", f"{r.seconds:.2f}", answer_words(r.output)])
        report["rows"].append({"task": "und", "row": name, "seconds": r.seconds, "count": r.count, "ids": r.output.ids,
                               "answer": r.output.text})
    return table, report


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    min_steps = FlashUConfig.for_task("gen").min_baseline_points()  # FlashU's shorter grid needs 2 points
    for name, low in (("steps", min_steps), ("max_new_tokens", 1), ("threads", 1)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else torch.bfloat16 if device.type == "cuda" else torch.float32
    load_optional_rows()
    try:
        rows = {task: select_rows(task, pick_rows(task, args.rows, parser)) for task in TASKS}
    except ValueError as err:  # a malformed variant or an option a row does not take
        parser.error(str(err))
    demo = load_demo_model(args, parser, device, dtype)
    args.steps = args.steps or demo.steps
    args.guidance = demo.guidance if args.guidance is None else args.guidance
    args.max_new_tokens = args.max_new_tokens or demo.max_new_tokens
    print(f"demo: {demo.model.config.name} ({demo.source}) on {device}, {dtype}")
    with intra_op_threads(auto_threads(args.threads, device, demo.model.config)):
        table, report = run_rows(args, rows, demo)
    print(f"question about the first {BASELINES['gen']} picture: {demo.question!r}")
    print(format_table(["task", "mode", "calls / tokens", "seconds", "output"], table))
    for row in report["rows"]:
        if "png" in row:
            print(f"image ({row['row']}, {demo.images_by}): {row['png']}")
    if report["grid"]:
        print(f"pictures of every row under their prompts: {report['grid']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"{time.perf_counter() - start:.1f} s")
