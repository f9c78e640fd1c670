"""Profile one compiled generation call at real shapes: where the time goes (kernel table, launch count).

    python -m harness.profile_gen --preset showo2-1.5b [--mode reduce-overhead]
"""

from __future__ import annotations

import argparse
import time

import torch

from flashu_fx.compiled import flashu_backend, generate_images_compiled
from flashu_fx.config import get_config
from harness.bench import build_random_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.profile_gen")
    parser.add_argument("--preset", default="showo2-1.5b")
    parser.add_argument("--mode", default=None, choices=[None, "reduce-overhead"])
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    model = build_random_model(get_config(args.preset), device, torch.bfloat16)
    backend = flashu_backend("gen", mode=args.mode)
    gen = torch.compile(model, backend=backend)
    prompt = [[100 + i for i in range(20)]]
    for _ in range(2):
        generate_images_compiled(gen, backend, prompt, baseline_steps=args.steps)
    torch.cuda.synchronize()
    start = time.perf_counter()
    generate_images_compiled(gen, backend, prompt, baseline_steps=args.steps)
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        generate_images_compiled(gen, backend, prompt, baseline_steps=4)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    print(f"{args.preset} mode={args.mode}: {total:.3f} s for {args.steps - 1} calls "
          f"({1000 * total / (args.steps - 1):.2f} ms/call); piece captures {dict(backend.piece_captures)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
