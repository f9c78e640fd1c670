"""Profile one compiled generation call at real shapes: where the time goes (kernel table, launch count).

    python -m harness.profile_gen --preset showo2-1.5b [--no-graphs] [--flashu] [--host-profile 40]

``--host-profile N``: also the N Python functions with the most own time over one warm image (cProfile), for the
idle stretches where the device waits on the host.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flashu_fx.compiled import (
    compiled_batch,
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
from harness.floors import compiled_prefix_len, device_rates, gen_image_flops_by_kind
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
    batch = compiled_batch(model.config, build_gen_batch(model.config, prompt).to(device))
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


@dataclass
class PipelinedCall:
    """One model call of an image sampled WITHOUT synchronising between calls (as a user runs it), in ms from the
    image's start: when the host entered and left the call, and when the device reached its start and end marks.
    ``device_wait_ms`` > 0: the device sat idle until the host launched this call (host-bound); ``host_ahead_ms``:
    how far the host ran ahead of the device when it entered the call (about 0: host and device in lockstep)."""

    host_start_ms: float
    host_end_ms: float
    device_start_ms: float
    device_end_ms: float

    @property
    def host_ms(self) -> float:
        return self.host_end_ms - self.host_start_ms

    @property
    def device_ms(self) -> float:
        return self.device_end_ms - self.device_start_ms

    @property
    def host_ahead_ms(self) -> float:
        return self.device_start_ms - self.host_start_ms


def pipelined_calls(gen, backend, model, prompt: list[list[int]], steps: int) -> tuple[list[PipelinedCall], float]:
    """One image through the sampler with CUDA events around every call but no synchronisation in between ->
    (one ``PipelinedCall`` per call, the image's device ms). CUDA only."""
    device = next(model.parameters()).device
    batch = compiled_batch(model.config, build_gen_batch(model.config, prompt).to(device))
    points = steps if backend.config is None else backend.config.num_points(steps)
    plans = backend.begin_image(points - 1, 10.0)
    velocity = stepped_velocity(gen, backend, batch)
    marks: list[tuple[float, float, torch.cuda.Event, torch.cuda.Event]] = []

    def timed(x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        start = time.perf_counter()
        v = velocity(x, t, step)
        returned = time.perf_counter()
        end.record()
        marks.append((start, returned, begin, end))
        return v

    noise = draw_noise((1, model.config.latent_channels, *model.config.latent_size), 0).to(device)
    origin = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    origin.record()  # on an idle device: its time is the host's ``host_origin``
    host_origin = time.perf_counter()
    with torch.no_grad():
        x = euler_sample(timed, noise, time_grid(points), [p.guidance for p in plans])
    done = torch.cuda.Event(enable_timing=True)
    done.record()
    torch.cuda.synchronize()
    del x
    calls = [PipelinedCall(1000 * (s - host_origin), 1000 * (r - host_origin), origin.elapsed_time(b),
                           origin.elapsed_time(e)) for s, r, b, e in marks]
    return calls, origin.elapsed_time(done)


def pipelined_table(records, calls: list[PipelinedCall]) -> str:
    """Median host ms, device ms and host lead per kind of call, sampled without synchronisation."""
    return _kind_table(records, calls, "host_ahead_ms", "host ahead ms")


def kernels_launched(prof) -> int:
    """Device kernels (and copies) in a ``torch.profiler`` run: inside CUDA graphs too."""
    return sum(e.count for e in prof.key_averages() if e.self_device_time_total > 0 and e.device_type.name == "CUDA")


def device_intervals(prof) -> list[tuple[str, float, float]]:
    """(name, start us, end us) of every device kernel and copy in a ``torch.profiler`` run, by start."""
    spans = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type.name == "CUDA"]
    return sorted(spans, key=lambda span: span[1])


def idle_gap_table(spans: list[tuple[str, float, float]], rows: int = 12) -> str:
    """Where the device sat idle between its kernels: the busy and idle time from the first kernel's start to the
    last one's end, then the idle time summed by the kernel that ended each gap (the work that came late)."""
    if not spans:
        return "no device kernels recorded"
    busy = idle = 0.0
    frontier = spans[0][1]
    by_next: dict[str, list[float]] = {}
    for name, start, end in spans:
        if start > frontier:
            gap = start - frontier
            idle += gap
            by_next.setdefault(name[:60], []).append(gap)
        busy += max(0.0, end - max(start, frontier))
        frontier = max(frontier, end)
    lines = [f"device busy {busy / 1000:.1f} ms, idle between kernels {idle / 1000:.1f} ms over {len(spans)} kernels",
             "idle ms  gaps  median us  kernel after the gap"]
    for name, gaps in sorted(by_next.items(), key=lambda item: -sum(item[1]))[:rows]:
        lines.append(f"{sum(gaps) / 1000:7.2f} {len(gaps):5d} {statistics.median(gaps):10.1f}  {name}")
    return "\n".join(lines)


KERNEL_KINDS = (  # (kind, name fragments), first match wins; lower-case
    ("attention", ("sdpa", "fmha", "flash", "attention", "cudnn")),
    ("matrix product", ("nvjet", "gemm", "gemv", "xmma", "cutlass", "_mma", "splitk")),
    ("triton, reduction", ("triton_red", "triton_per")),
    ("triton, pointwise", ("triton_poi",)),
    ("memset / copy", ("memset", "memcpy")),
)


def kernel_kind(name: str) -> str:
    """What a device kernel does, from its name (``KERNEL_KINDS``); "other" (eager ATen kernels, custom ops)."""
    lower = name.lower()
    return next((kind for kind, fragments in KERNEL_KINDS if any(f in lower for f in fragments)), "other")


def kernel_kind_table(spans: list[tuple[str, float, float]], floors_ms: dict[str, float] | None = None) -> str:
    """Device time and launches per ``kernel_kind`` of an image's kernels (``device_intervals``), against the FLOP
    floor of that kind where one is given (``floors_ms``: "matrix product", "attention")."""
    kinds: dict[str, list[float]] = {}
    for name, start, end in spans:
        kinds.setdefault(kernel_kind(name), []).append(end - start)
    floors_ms = floors_ms or {}
    total = sum(sum(t) for t in kinds.values()) or 1.0
    lines = ["kind                 launches  device ms  share  floor ms  of floor"]
    for kind, times in sorted(kinds.items(), key=lambda item: -sum(item[1])):
        ms = sum(times) / 1000
        floor = floors_ms.get(kind)
        at = f"{floor:8.1f}  {100 * floor / ms:7.0f}%" if floor else ""
        lines.append(f"{kind:20s} {len(times):8d} {ms:10.1f} {100 * sum(times) / total:5.1f}%  {at}".rstrip())
    return "\n".join(lines)


def call_kind_table(records, timings: list[CallTiming]) -> str:
    """Median host, device and total ms per kind of call (head action, trunk run, layers skipped, measuring)."""
    return _kind_table(records, timings, "total_ms", "total ms")


def _kind_table(records, timings: list, last: str, last_header: str) -> str:
    """Medians of ``host_ms``, ``device_ms`` and ``last`` per kind of call (head action, trunk run, layers skipped,
    measuring): one line per kind after a header."""
    kinds: dict[tuple, list] = {}
    for record, timing in zip(records, timings, strict=True):
        kind = (record.head, int(record.trunk_ran), len(record.skip_set), int(record.importance is not None))
        kinds.setdefault(kind, []).append(timing)
    lines = [f"head     trunk skipped measure  calls  host ms  device ms  {last_header}"]
    width = len(last_header) + 1
    for (head, trunk, skipped, measure), group in sorted(kinds.items()):
        med = [statistics.median(getattr(t, f) for t in group) for f in ("host_ms", "device_ms", last)]
        lines.append(f"{head:8s} {trunk:5d} {skipped:7d} {measure:7d} {len(group):6d} {med[0]:8.2f} {med[1]:10.2f} "
                     f"{med[2]:{width}.2f}")
    return "\n".join(lines)


def host_profile(image: Callable[[], object], rows: int) -> str:
    """The ``rows`` functions with the most own time while ``image()`` runs and the device finishes, by cProfile."""
    profiler = cProfile.Profile()
    profiler.enable()
    image()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(rows)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("python -m harness.profile_gen", __doc__)
    parser.add_argument("--preset", default="showo2-1.5b", help="model shapes")
    parser.add_argument("--no-graphs", action="store_true", help="run the compiled parts without CUDA graphs")
    parser.add_argument("--flashu", action="store_true", help="FlashU defaults with a random FFN layout")
    parser.add_argument("--steps", type=int, default=50, help="baseline grid points")
    parser.add_argument("--trace", default="", help="also write the profiled image's Chrome trace to this path")
    parser.add_argument("--host-profile", type=int, default=0, metavar="N",
                        help="also list the N Python functions with the most own time over one image (cProfile)")
    args = parser.parse_args(argv)
    if args.host_profile < 0:
        parser.error(f"--host-profile={args.host_profile} is invalid: allowed 0 (off) or a positive count")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device: it times and profiles GPU kernels (CPU checks: python -m harness bench)")
    device = torch.device("cuda")
    model = build_random_model(get_config(args.preset), device, torch.bfloat16)
    config = layout = None
    if args.flashu:
        config = FlashUConfig.for_task("gen")
        layout = permute_for(model, config, random_ffn_scores(model))
    backend = flashu_backend("gen", config, layout, cuda_graphs=not args.no_graphs)
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
    print("every call synchronised:")
    print(call_kind_table(backend.records, per_call))
    pipelined, image_ms = pipelined_calls(gen, backend, model, prompt, args.steps)
    print(f"no synchronisation between calls (as sampled): {image_ms:.1f} ms for the image")
    print(pipelined_table(backend.records, pipelined))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        generate_images_compiled(gen, backend, prompt, baseline_steps=args.steps)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    print(f"device kernels and copies per image: {kernels_launched(prof)}")
    spans = device_intervals(prof)
    print(idle_gap_table(spans))
    rates = device_rates(torch.cuda.get_device_name())
    flops = gen_image_flops_by_kind(model.config, config, args.steps, compiled_prefix_len(model.config, prompt[0]))
    floors_ms = {"matrix product": 1e3 * rates.compute_s(flops["linear"]),
                 "attention": 1e3 * rates.compute_s(flops["attention"])} if rates else None
    print(kernel_kind_table(spans, floors_ms))
    if args.trace:
        prof.export_chrome_trace(args.trace)
    if args.host_profile:
        print(host_profile(lambda: generate_images_compiled(gen, backend, prompt, baseline_steps=args.steps),
                           args.host_profile))
    calls = args.steps - 1 if config is None else config.num_points(args.steps) - 1
    print(f"{args.preset} graphs={not args.no_graphs} flashu={args.flashu}: "
          f"{total:.3f} s for {calls} calls ({1000 * total / calls:.2f} ms/call); "
          f"part compilations {dict(backend.piece_captures)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
