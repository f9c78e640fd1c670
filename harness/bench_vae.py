"""``python -m harness bench-vae``: time the Wan2.1 VAE decode and encode at Show-o2's shapes (random weights).

    python -m harness bench-vae                                # cuda when available; runs/bench/bench_vae.json
    python -m harness bench-vae --vae ckpt/wan2.1-vae-diffusers --compile
    python -m harness bench-vae --device cpu --size 16 --repeats 1       # smoke test

Without ``--vae`` the VAE is diffusers' ``AutoencoderKLWan()`` with its default config, which is the Wan2.1 VAE's
architecture (base width 96, multipliers 1-2-4-4, 16 latent channels), randomly initialised: convolution time
does not depend on the weight values. The timed region is what ``generate`` runs per picture:
``WanLatentCodec.decode_to_images`` (de-normalise, decode one frame, clamp, to uint8 on the CPU) for a batch of
``--batch`` latents (B, 16, size, size), and ``encode`` of (B, 3, 8 size, 8 size) pixels. Each row's floor is
its counted FLOPs (torch.utils.flop_counter) at the device's measured bf16 matmul rate.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from flashu_fx.vae import WanLatentCodec, diffusers_available, load_wan_vae
from harness.arguments import command_parser, existing_directory
from harness.devices import device_name, resolve_device
from harness.floors import peak_tflops
from harness.rows import median_seconds
from harness.tables import format_table

ANCHOR_DECODE_S = 0.018  # upstream's Wan2.1 decode of one 54 x 54 latent on an H200 (docs/REFERENCE_MEASUREMENTS.md)


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("python -m harness bench-vae", __doc__)
    p.add_argument("--vae", type=existing_directory, default=None, metavar="DIR",
                   help="a local diffusers-format Wan2.1 VAE (default: the architecture with random weights)")
    p.add_argument("--size", type=int, default=54, help="latent side (Show-o2: 54, a 432 x 432 picture)")
    p.add_argument("--batch", type=int, default=1, help="latents per decode call")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per row (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per row before timing")
    p.add_argument("--compile", action="store_true", help="also time the decoder through torch.compile (inductor)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: cuda when available")
    p.add_argument("--seed", type=int, default=0, help="weights (without --vae) and latents")
    p.add_argument("--out", type=Path, default=Path("runs/bench/bench_vae.json"), help="the JSON report")
    return p


def random_wan_vae(device: torch.device, seed: int):
    """``AutoencoderKLWan()``: diffusers' default config is the Wan2.1 VAE's architecture; fp32, eval mode."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan().to(device).eval()


def counted_tflop(fn: Callable[[], Any]) -> float:
    """The FLOPs ``fn`` runs (matmuls and convolutions, as torch's flop counter counts them), in TFLOP."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops() / 1e12


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    for name in ("size", "batch", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name} must be >= 1, got {getattr(args, name)}")
    if not diffusers_available():
        raise SystemExit("error: bench-vae needs diffusers (the [vae] extra): pip install 'flashu-fx[vae]'")
    device = resolve_device(args.device)
    vae = load_wan_vae(args.vae, device=device) if args.vae else random_wan_vae(device, args.seed)
    codec = WanLatentCodec(vae)
    gen = torch.Generator().manual_seed(args.seed)
    latents = torch.randn(args.batch, codec.channels, args.size, args.size, generator=gen).to(device)
    pixels = (torch.rand(args.batch, 3, args.size * codec.scale, args.size * codec.scale, generator=gen) * 2 - 1)
    pixels = pixels.to(device)
    rows: dict[str, Callable[[], Any]] = {
        "decode (eager)": lambda: codec.decode_to_images(latents),
        "encode (eager)": lambda: codec.encode(pixels),
    }
    if args.compile:
        compiled = WanLatentCodec(vae)
        compiled.vae = torch.compile(vae)  # the same weights; diffusers' decode runs its compiled modules
        rows["decode (compiled)"] = lambda: compiled.decode_to_images(latents)
    name = device_name(device)
    peak = peak_tflops(name)
    records = []
    for row, fn in rows.items():
        seconds = median_seconds(fn, device, args.repeats, args.warmup)
        tflop = counted_tflop(fn)
        floor = tflop / peak if peak else None
        records.append(dict(row=row, seconds=seconds, per_image_s=seconds / args.batch, tflop=tflop,
                            floor_s=floor, share_of_floor=floor / seconds if floor else None))
    base = records[0]["seconds"]
    table = format_table(
        ["row", "s/call", "s/image", "speed-up", "TFLOP", "floor s", "share of floor"],
        [[r["row"], f"{r['seconds']:.4f}", f"{r['per_image_s']:.4f}",
          f"{base / r['seconds']:.2f}x" if r["row"].startswith("decode") else "-",
          f"{r['tflop']:.3f}", "-" if r["floor_s"] is None else f"{r['floor_s']:.4f}",
          "-" if r["share_of_floor"] is None else f"{100 * r['share_of_floor']:.0f}%"] for r in records])
    print(f"Wan2.1 VAE, latents {args.batch} x {codec.channels} x {args.size} x {args.size} -> "
          f"{args.size * codec.scale} px, {'weights ' + str(args.vae) if args.vae else 'random weights'}, {name}")
    print(table)
    if device.type == "cuda" and args.size == 54 and args.batch == 1:
        print(f"upstream's decode on an H200: {ANCHOR_DECODE_S * 1000:.0f} ms")
    report = dict(command="python -m harness bench-vae " + shlex.join(sys.argv[1:] if argv is None else argv),
                  device=name, torch=torch.__version__, size=args.size, batch=args.batch, repeats=args.repeats,
                  warmup=args.warmup, weights=str(args.vae) if args.vae else "random (AutoencoderKLWan())",
                  peak_tflops=peak, anchor_decode_s=ANCHOR_DECODE_S, rows=records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
