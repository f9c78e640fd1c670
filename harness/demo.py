"""``python -m harness demo``: text-to-image for two prompts and one question about the first image, once per
registered row, with a short table and a PNG.

    python -m harness demo                                        # tiny preset, random weights, CPU, seconds
    python -m harness demo --weights ckpt/show-o2-1.5B --tokenizer ckpt/qwen2.5-1.5b-instruct \
        --vae ckpt/wan2.1-vae-diffusers --device cuda

Random weights are non-degenerate, so the images are structured noise (shown through the latent preview);
with ``--weights`` (and ``--vae``, when diffusers is installed) they are real images. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from flashu_fx.config import PRESETS, get_config
from flashu_fx.loading import from_pretrained
from flashu_fx.model import Showo2
from flashu_fx.tokenizer import get_tokenizer
from flashu_fx.vae import WanLatentCodec, diffusers_available
from harness.bench import DTYPES, auto_threads, build_random_model, format_table, intra_op_threads, resolve_device
from harness.images import image_grid, latents_to_images, write_png
from harness.rows import (
    BASELINES,
    TASKS,
    GenContext,
    UndContext,
    load_optional_rows,
    parse_variant,
    rows_for,
    select_rows,
    split_row_names,
    summarize,
    time_row,
)

PROMPTS = (
    "A red fox sitting in a snowy forest at dawn.",
    "A bowl of ramen with a soft-boiled egg, top view.",
)
QUESTION = "What is in this image?"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness demo", description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="shapes of the random model")
    p.add_argument("--weights", type=Path, default=None, help="local Show-o2 checkpoint dir (overrides --preset)")
    p.add_argument("--tokenizer", type=Path, default=None, help="local Qwen2.5 tokenizer dir (default: bytes)")
    p.add_argument(
        "--vae", type=Path, default=None, help="local diffusers-format Wan2.1 VAE dir (the folder with its config.json)"
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto", help="auto: bf16 on CUDA, else fp32")
    p.add_argument("--steps", type=int, default=50, help="grid points (model calls = steps - 1)")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale (upstream demo default)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="understanding: most tokens to generate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: 1 for tiny models on CPU)")
    p.add_argument(
        "--rows",
        type=split_row_names,
        default=None,
        help="comma-separated row names of either task (default: every registered row; baselines always run)",
    )
    return p


def load_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Showo2:
    if args.weights is not None:
        return from_pretrained(args.weights, dtype=dtype, device=device)
    return build_random_model(get_config(args.preset), device, dtype, args.seed)


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


def run_rows(args, rows: dict, model: Showo2, tok, vae) -> tuple[list[list[str]], dict]:
    """t2i for ``PROMPTS`` with every gen row (one PNG each), then ``QUESTION`` about the first image."""
    table, report = [], {"model": model.config.name, "device": str(next(model.parameters()).device), "rows": []}
    gen_ctx = GenContext(model, [tok.encode(p) for p in PROMPTS], args.steps, args.guidance, args.seed, tok, True)
    gen_out = {}
    for name, fn in rows["gen"].items():
        r = time_row("gen", name, fn, gen_ctx, warmup=0, repeats=1)
        gen_out[name] = r.output
        stem = re.sub(r"[^\w.-]+", "_", name).strip("_")  # a variant's brackets and '=' stay out of file names
        png = write_png(args.out / f"t2i_{stem}.png", image_grid(latents_to_images(r.output, vae)))
        table.append(["t2i", name, f"{r.count} calls", f"{r.seconds:.2f}", summarize("gen", r.output)])
        report["rows"].append({"task": "gen", "row": name, "seconds": r.seconds, "count": r.count, "png": str(png)})
    # The question is about the first generated image (its latents are the VAE's normalised latents).
    latents = gen_out[BASELINES["gen"]][:1]
    und_ctx = UndContext(model, latents, QUESTION, tok, args.max_new_tokens, stop_at_eos=True, progress=True)
    for name, fn in rows["und"].items():
        r = time_row("und", name, fn, und_ctx, warmup=0, repeats=1)
        table.append(["und", name, f"{r.count} tokens", f"{r.seconds:.2f}", summarize("und", r.output)])
        report["rows"].append({"task": "und", "row": name, "seconds": r.seconds, "count": r.count, "ids": r.output.ids})
    return table, report


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, low in (("steps", 2), ("max_new_tokens", 1), ("threads", 1)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else torch.bfloat16 if device.type == "cuda" else torch.float32
    load_optional_rows()
    try:
        rows = {task: select_rows(task, pick_rows(task, args.rows, parser)) for task in TASKS}
    except ValueError as err:  # a malformed variant or an option a row does not take
        parser.error(str(err))
    model = load_model(args, device, dtype)
    tok = get_tokenizer(model.config, args.tokenizer)
    vae = load_vae(args.vae, device)
    source = f"weights {args.weights}" if args.weights else "random weights"
    print(f"demo: {model.config.name} ({source}) on {device}, {dtype}")
    with intra_op_threads(auto_threads(args.threads, device, model.config)):
        table, report = run_rows(args, rows, model, tok, vae)
    print(format_table(["task", "mode", "calls / tokens", "seconds", "output"], table))
    for row in report["rows"]:
        if "png" in row:
            print(f"image ({row['row']}, {'VAE' if vae is not None else 'latent preview'}): {row['png']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"{time.perf_counter() - start:.1f} s")
