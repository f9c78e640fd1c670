"""Profile one compiled generation call at real shapes: where the time goes (kernel table, launch count).

    python -m harness.profile_gen --preset showo2-1.5b [--no-graphs] [--flashu] [--executor graph]
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from flashu_fx.compiled import (
    executor_batch,
    flashu_backend,
    generate_images_compiled,
    lean_guard_options,
    stepped_velocity,
)
from flashu_fx.config import get_config
from flashu_fx.flashu_config import FlashUConfig
from flashu_fx.layout import build_gen_batch
from flashu_fx.sampler import draw_noise, euler_sample, time_grid
from harness.arguments import command_parser
from harness.flashu_rows import permute_for, random_ffn_scores
from harness.random_model import build_random_model
from harness.rows import synchronize


@dataclass
class CallTiming:
    """One model call, timed from an idle device: ``host_ms`` until the call returned (Python, Dynamo, launches),
    ``device_ms`` between CUDA events around it (the device's work, plus any wait for the host's first launch),
    ``total_ms`` until the device finished."""

    host_ms: float
    device_ms: float
    total_ms: float


def timed_calls(gen, backend, model, prompt: list[list[int]], steps: int) -> list[CallTiming]:
    """One image through the sampler (``gen``: ``model`` compiled with ``backend``), the device synchronised
    around every model call."""
    device = next(model.parameters()).device
    batch = executor_batch(backend, model.config, build_gen_batch(model.config, prompt).to(device))
    points = steps if backend.config is None else backend.config.num_points(steps)
    plans = backend.begin_image(points - 1, 10.0)
    velocity = stepped_velocity(gen, backend, batch)
    per_call: list[CallTiming] = []
    cuda = device.type == "cuda"

    def timed(x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        synchronize(device)
        begin, end = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda \
            else (None, None)
        if cuda:
            begin.record()
        start = time.perf_counter()
        v = velocity(x, t, step)
        returned = time.perf_counter()
        if cuda:
            end.record()
        synchronize(device)
        done = time.perf_counter()
        device_ms = begin.elapsed_time(end) if cuda else 1000 * (done - start)
        per_call.append(CallTiming(1000 * (returned - start), device_ms, 1000 * (done - start)))
        return v

    noise = draw_noise((1, model.config.latent_channels, *model.config.latent_size), 0).to(device)
    with torch.no_grad():
        euler_sample(timed, noise, time_grid(points), [p.guidance for p in plans])
    return per_call


def call_kind_table(records, timings: list[CallTiming]) -> str:
    """Median host, device and total ms per kind of call (head action, trunk run, layers skipped, measuring)."""
    kinds: dict[tuple, list[CallTiming]] = {}
    for record, timing in zip(records, timings, strict=True):
        kind = (record.head, int(record.trunk_ran), len(record.skip_set), int(record.importance is not None))
        kinds.setdefault(kind, []).append(timing)
    lines = ["head     trunk skipped measure  calls  host ms  device ms  total ms"]
    for (head, trunk, skipped, measure), group in sorted(kinds.items()):
        med = [statistics.median(getattr(t, f) for t in group) for f in ("host_ms", "device_ms", "total_ms")]
        lines.append(f"{head:8s} {trunk:5d} {skipped:7d} {measure:7d} {len(group):6d} {med[0]:8.2f} {med[1]:10.2f} "
                     f"{med[2]:9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("python -m harness.profile_gen", __doc__)
    parser.add_argument("--preset", default="showo2-1.5b", help="model shapes")
    parser.add_argument("--no-graphs", action="store_true", help="run the pieces without CUDA graphs")
    parser.add_argument("--flashu", action="store_true", help="FlashU defaults with a random FFN layout")
    parser.add_argument("--executor", default="runtime", choices=("runtime", "graph"),
                        help="flashu_backend's executor")
    parser.add_argument("--steps", type=int, default=50, help="baseline grid points")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device: it times and profiles GPU kernels (CPU checks: python -m harness bench)")
    device = torch.device("cuda")
    model = build_random_model(get_config(args.preset), device, torch.bfloat16)
    config = layout = None
    if args.flashu:
        config = FlashUConfig.for_task("gen")
        layout = permute_for(model, config, random_ffn_scores(model))
    backend = flashu_backend("gen", config, layout, cuda_graphs=not args.no_graphs, executor=args.executor)
    gen = torch.compile(model, backend=backend, options=lean_guard_options())
    prompt = [[100 + i for i in range(20)]]
    for _ in range(2):
        generate_images_compiled(gen, backend, prompt, baseline_steps=args.steps)
    torch.cuda.synchronize()
    start = time.perf_counter()
    generate_images_compiled(gen, backend, prompt, baseline_steps=args.steps)
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    per_call = timed_calls(gen, backend, model, prompt, args.steps)
    print(call_kind_table(backend.records, per_call))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        generate_images_compiled(gen, backend, prompt, baseline_steps=args.steps)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    calls = args.steps - 1 if config is None else config.num_points(args.steps) - 1
    print(f"{args.preset} executor={args.executor} graphs={not args.no_graphs} flashu={args.flashu}: "
          f"{total:.3f} s for {calls} calls ({1000 * total / calls:.2f} ms/call); "
          f"piece captures {dict(backend.piece_captures)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
