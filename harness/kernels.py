"""Microbenchmark of the Triton kernels against their torch references (`python -m harness kernels`).

For vnorm_topk, at each (batch, length, layout): check exact index equality with the reference, then
time the op and the natural eager torch version (slice -> float -> norm -> topk -> sort) two ways:
- gpu: device time per call, from CUDA events around replays of one CUDA graph that calls the op on
  many input copies in turn (>= 256 MB of them, so each call reads from HBM, not L2); launch
  overheads excluded, as in the compiled model, which runs under CUDA graphs;
- wall: host time per call of back-to-back eager calls (launch and dispatch overheads included).
Bandwidth counts the bytes of V read (B * length * KV*D * itemsize) against the device's copy
bandwidth, measured here (1 GiB device-to-device copy, bytes read + written).
--sweep also times launch configs and every threshold search (`SELECTS`: the default radix search and the
tl.histogram variants) at each shape, and prints which search is fastest there.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import time
from collections.abc import Callable

import torch

from harness.arguments import command_parser
from triton_kernels.vnorm_topk import SELECTS, launch_config, vnorm_topk, vnorm_topk_launch, vnorm_topk_reference

LAYOUTS = {"1.5B": (2, 128), "7B": (4, 128)}  # Show-o2 v_proj: (n_kv_heads, head_dim)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PREFIX = 37  # text tokens before the image span
ROTATE_BYTES = 256 * 2**20  # input copies per graph: several times any L2 (H100 50 MB, H200 60 MB)
SWEEP = [(t, w) for t in (8, 16, 32, 64) for w in (4, 8, 16)]  # (BLOCK_T, num_warps) of the radix search
SELECT_WARPS = (4, 8, 16)  # every search (SELECTS): at the shape's default BLOCK_T, each num_warps


def eager_topk(v: torch.Tensor, start: int, length: int, keep: int) -> torch.Tensor:
    """The natural eager implementation the kernel replaces (fp32 norms, topk's own tie order)."""
    norm = v[:, start : start + length].float().norm(dim=-1)
    return norm.topk(keep, dim=-1, largest=False).indices.sort(dim=-1).values + start


def capture_graph(calls: list[Callable[[], object]]) -> torch.cuda.CUDAGraph:
    """One CUDA graph that makes all ``calls`` in turn, warmed up (JIT, allocator) outside the capture and replayed
    once."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls[:2]:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    return graph


def graph_us(calls: list[Callable[[], object]], replays: int = 15) -> float:
    """Median device time per call over replays of one CUDA graph that makes all `calls` in turn."""
    graph = capture_graph(calls)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def wall_us(call: Callable[[], object], iters: int = 200) -> float:
    for _ in range(10):
        call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e6


def copy_gbps() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written; eager, as a copy captured in a graph
    becomes a memcpy node, which ran at 2.8 TB/s on an H200 against 4.2 TB/s eager."""
    import triton.testing

    src = torch.empty(2**28, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * src.nbytes / ms / 1e6


def select_summary(rows: list[dict], default_warps: int, default_select: str) -> dict:
    """Sweep rows of one shape at one BLOCK_T -> each search's best exact time over num_warps, the default
    config's (the op's search at its num_warps) and the fastest search."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["exact"] and (r["select"] not in best or r["gpu_us"] < best[r["select"]]["gpu_us"]):
            best[r["select"]] = r
    default = next(r for r in rows if r["select"] == default_select and r["num_warps"] == default_warps)
    fastest = min(best.values(), key=lambda r: r["gpu_us"])
    return {
        "default_us": default["gpu_us"], "fastest": fastest["select"], "fastest_warps": fastest["num_warps"],
        "fastest_us": fastest["gpu_us"], "speedup_vs_default": default["gpu_us"] / fastest["gpu_us"],
        "best": {k: {"gpu_us": r["gpu_us"], "num_warps": r["num_warps"]} for k, r in best.items()},
    }  # fmt: skip


def bench_case(batch: int, length: int, layout: str, args: argparse.Namespace, copy: float) -> tuple[dict, list[dict]]:
    kv, head_dim = LAYOUTS[layout]
    c = kv * head_dim
    keep = max(1, round(length * args.keep_ratio))
    shape = (batch, PREFIX + length + 16, c)
    bytes_v = batch * length * c * DTYPES[args.dtype].itemsize
    copies = [torch.randn(shape, device="cuda").to(DTYPES[args.dtype]) for _ in range(2)]
    for v in copies:
        v[:, PREFIX + 10 : PREFIX + 20] = v[:, PREFIX + 30 : PREFIX + 40]  # some exact ties
    n_sets = min(256, max(4, math.ceil(ROTATE_BYTES / bytes_v)))
    copies += [copies[i % 2].clone() for i in range(2, n_sets)]
    v = copies[0]
    got = vnorm_topk(v, PREFIX, length, keep)
    exact = all(torch.equal(vnorm_topk(x, PREFIX, length, keep), vnorm_topk_reference(x, PREFIX, length, keep))
                for x in copies[:2])  # fmt: skip
    agree = (got == eager_topk(v, PREFIX, length, keep)).all(dim=-1).float().mean().item()

    def each(fn: Callable[..., object]) -> list[Callable[[], object]]:
        return [functools.partial(fn, x, PREFIX, length, keep) for x in copies]

    kernel, ref = graph_us(each(vnorm_topk)), graph_us(each(eager_topk))
    gbps = bytes_v / kernel / 1e3
    row = {
        "batch": batch, "length": length, "layout": layout, "C": c, "keep": keep, "bytes_v": bytes_v,
        "exact_vs_reference": exact, "rows_agreeing_with_eager_fp32": agree,
        "gpu_us": kernel, "ref_gpu_us": ref, "speedup": ref / kernel, "GBps": gbps, "pct_copy_bw": 100 * gbps / copy,
        "wall_us": wall_us(each(vnorm_topk)[0]), "ref_wall_us": wall_us(each(eager_topk)[0]),
        "raw_launch_wall_us": wall_us(functools.partial(vnorm_topk_launch, v, PREFIX, length, keep)),
    }  # fmt: skip
    row["wall_speedup"] = row["ref_wall_us"] / row["wall_us"]
    sweep = []
    if args.sweep:
        want = vnorm_topk_reference(v, PREFIX, length, keep)
        cfg_t, _, cfg_warps, cfg_select = launch_config(length, c)
        # SWEEP for the radix search, then every search at cfg_t with each SELECT_WARPS and the default
        # num_warps (configs SWEEP has are not repeated): the rows select_summary compares.
        grid = [("radix", t, w) for t, w in SWEEP]
        grid += [(select, cfg_t, w) for select in SELECTS for w in sorted({*SELECT_WARPS, cfg_warps})
                 if (select, cfg_t, w) not in grid]  # fmt: skip
        for select, block_t, warps in grid:
            calls = [functools.partial(vnorm_topk_launch, x, PREFIX, length, keep, block_t, warps, select=select)
                     for x in copies]  # fmt: skip
            ok = torch.equal(calls[0](), want)
            us = graph_us(calls, replays=5)
            sweep.append({"batch": batch, "length": length, "layout": layout, "select": select, "BLOCK_T": block_t,
                          "num_warps": warps, "exact": ok, "gpu_us": us, "GBps": bytes_v / us / 1e3})  # fmt: skip
        row["select"] = select_summary([s for s in sweep if s["BLOCK_T"] == cfg_t], cfg_warps, cfg_select)
    return row, sweep


def main(argv: list[str] | None = None) -> int:
    p = command_parser("python -m harness kernels", __doc__)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8], help="batch sizes")
    p.add_argument("--length", type=int, nargs="+", default=[729, 4096], help="image tokens per row")
    p.add_argument("--layout", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS), help="v_proj layout")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="V dtype")
    p.add_argument("--keep-ratio", type=float, default=0.5, help="kept fraction (FlashU und: 0.5)")
    p.add_argument(
        "--sweep", action="store_true", help="also time every (BLOCK_T, num_warps) config and threshold search"
    )
    p.add_argument("--out", default="kernels.json", help="JSON output path")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("harness kernels: needs a CUDA GPU (the kernels' CPU path is the torch reference)")
        return 1
    import triton

    copy = copy_gbps()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy:.0f} GB/s (read + write)")
    print(" B   len layout | gpu us  ref us      x   GB/s  %copy | wall us  ref us  x wall | exact eager-agree")
    rows, sweeps = [], []
    for length in args.length:
        for layout in args.layout:
            for batch in args.batch:
                row, sweep = bench_case(batch, length, layout, args, copy)
                rows.append(row)
                sweeps += sweep
                print(
                    f"{batch:>2} {length:>5} {layout:>6} | {row['gpu_us']:>6.1f} {row['ref_gpu_us']:>7.1f} "
                    f"{row['speedup']:>6.1f} {row['GBps']:>6.0f} {row['pct_copy_bw']:>6.1f} | "
                    f"{row['wall_us']:>7.1f} {row['ref_wall_us']:>7.1f} {row['wall_speedup']:>6.1f} | "
                    f"{row['exact_vs_reference']!s:>5} {row['rows_agreeing_with_eager_fp32']:>5.2f}"
                )
    for s in sweeps:
        print(f"sweep B={s['batch']} len={s['length']} {s['layout']} {s['select']:>5} BLOCK_T={s['BLOCK_T']:>2} "
              f"warps={s['num_warps']:>2}: {s['gpu_us']:7.1f} us {s['GBps']:6.0f} GB/s exact={s['exact']}")  # fmt: skip
    if args.sweep:
        print(f"threshold search: gpu us at the default BLOCK_T, best over num_warps {SELECT_WARPS} + default")
        print(" B   len layout | default | " + " ".join(f"{name:>6}" for name in SELECTS) + " | fastest")
        for r in rows:
            sel = r["select"]
            times = " ".join(f"{sel['best'][k]['gpu_us']:>6.1f}" if k in sel["best"] else "   n/a" for k in SELECTS)
            print(f"{r['batch']:>2} {r['length']:>5} {r['layout']:>6} | {sel['default_us']:>7.1f} | {times} | "
                  f"{sel['fastest']} warps={sel['fastest_warps']} {sel['speedup_vs_default']:.2f}x")  # fmt: skip
    result = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "dtype": args.dtype, "copy_GBps": copy, "vnorm_topk": rows, "vnorm_topk_sweep": sweeps,
    }  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0 if all(r["exact_vs_reference"] for r in rows) and all(s["exact"] for s in sweeps) else 1


if __name__ == "__main__":
    raise SystemExit(main())
