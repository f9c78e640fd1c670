"""Microbenchmark of the Triton kernels against their torch references (`python -m harness kernels`).

For vnorm_topk: at each (batch, length, layout) checks exact index equality with the reference, then
times the kernel and the natural eager torch version (slice -> float -> norm -> topk -> sort) with
`triton.testing.do_bench` (median, L2 flushed before each call, so GPU time from a cold cache) and a
back-to-back host loop (wall time per call, launch overheads included). Bandwidth counts the bytes
of V read (B * length * KV*D * itemsize) against the device's copy bandwidth, measured here.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable

import torch

from triton_kernels.vnorm_topk import _launch, vnorm_topk, vnorm_topk_reference

LAYOUTS = {"1.5B": (2, 128), "7B": (4, 128)}  # Show-o2 v_proj: (n_kv_heads, head_dim)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PREFIX = 37  # text tokens before the image span
SWEEP = [(t, w) for t in (4, 8, 16, 32, 64) for w in (4, 8, 16)]


def eager_topk(v: torch.Tensor, start: int, length: int, keep: int) -> torch.Tensor:
    """The natural eager implementation the kernel replaces (fp32 norms, topk's own tie order)."""
    norm = v[:, start : start + length].float().norm(dim=-1)
    return norm.topk(keep, dim=-1, largest=False).indices.sort(dim=-1).values + start


def gpu_us(fn: Callable[[], object], rep_ms: int) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median") * 1e3


def wall_us(fn: Callable[[], object], iters: int = 200) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e6


def copy_gbps(rep_ms: int) -> float:
    """Device-to-device copy of 1 GiB, bytes read + written."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    us = gpu_us(lambda: dst.copy_(src), rep_ms)
    return 2 * src.nbytes / us / 1e3


def bench_case(
    batch: int, length: int, layout: str, dtype: torch.dtype, keep_ratio: float, copy: float, args: argparse.Namespace
) -> tuple[dict, list[dict]]:
    kv, head_dim = LAYOUTS[layout]
    c = kv * head_dim
    keep = max(1, round(length * keep_ratio))
    v = torch.randn(batch, PREFIX + length + 16, c, device="cuda", dtype=dtype)
    v[:, PREFIX + 10 : PREFIX + 20] = v[:, PREFIX + 30 : PREFIX + 40]  # some exact ties
    got = vnorm_topk(v, PREFIX, length, keep)
    exact = torch.equal(got, vnorm_topk_reference(v, PREFIX, length, keep))
    agree = (got == eager_topk(v, PREFIX, length, keep)).all(dim=-1).float().mean().item()
    bytes_v = v[:, :length].numel() * v.element_size()

    kernel = gpu_us(lambda: vnorm_topk(v, PREFIX, length, keep), args.rep_ms)
    ref = gpu_us(lambda: eager_topk(v, PREFIX, length, keep), args.rep_ms)
    kernel_wall = wall_us(lambda: vnorm_topk(v, PREFIX, length, keep))
    ref_wall = wall_us(lambda: eager_topk(v, PREFIX, length, keep))
    gbps = bytes_v / kernel / 1e3
    row = {
        "batch": batch, "length": length, "layout": layout, "C": c, "keep": keep, "bytes_v": bytes_v,
        "exact_vs_reference": exact, "rows_agreeing_with_eager_fp32": agree,
        "kernel_us": kernel, "ref_us": ref, "speedup": ref / kernel,
        "kernel_wall_us": kernel_wall, "ref_wall_us": ref_wall, "wall_speedup": ref_wall / kernel_wall,
        "GBps": gbps, "pct_copy_bw": 100 * gbps / copy,
    }  # fmt: skip
    sweep = []
    if args.sweep:
        want = vnorm_topk_reference(v, PREFIX, length, keep)
        for block_t, warps in SWEEP:
            fn = functools.partial(_launch, v, None, PREFIX, length, keep, block_t=block_t, num_warps=warps)
            ok = torch.equal(fn(), want)
            us = gpu_us(fn, max(20, args.rep_ms // 4))
            sweep.append({"batch": batch, "length": length, "layout": layout, "BLOCK_T": block_t,
                          "num_warps": warps, "exact": ok, "us": us, "GBps": bytes_v / us / 1e3})  # fmt: skip
    return row, sweep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness kernels", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8], help="batch sizes")
    p.add_argument("--length", type=int, nargs="+", default=[729, 4096], help="image tokens per row")
    p.add_argument("--layout", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS), help="v_proj layout")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--keep-ratio", type=float, default=0.5, help="kept fraction (FlashU und: 0.5)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time per measurement")
    p.add_argument("--sweep", action="store_true", help="also time every (BLOCK_T, num_warps) config")
    p.add_argument("--out", default="kernels.json", help="JSON output path")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("harness kernels: needs a CUDA GPU (the kernels' CPU path is the torch reference)")
        return 1
    import triton

    copy = copy_gbps(args.rep_ms)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy:.0f} GB/s (read + write)")
    rows, sweeps = [], []
    head = f"{'B':>2} {'len':>5} {'layout':>6} {'kernel us':>9} {'ref us':>8} {'x':>6} {'GB/s':>6} {'%copy':>6}"
    print(head + f" {'wall us':>8} {'ref wall':>8} {'x wall':>6} exact eager-agree")
    for length in args.length:
        for layout in args.layout:
            for batch in args.batch:
                row, sweep = bench_case(batch, length, layout, DTYPES[args.dtype], args.keep_ratio, copy, args)
                rows.append(row)
                sweeps += sweep
                print(
                    f"{batch:>2} {length:>5} {layout:>6} {row['kernel_us']:>9.1f} {row['ref_us']:>8.1f} "
                    f"{row['speedup']:>6.1f} {row['GBps']:>6.0f} {row['pct_copy_bw']:>6.1f} "
                    f"{row['kernel_wall_us']:>8.1f} {row['ref_wall_us']:>8.1f} {row['wall_speedup']:>6.1f} "
                    f"{row['exact_vs_reference']!s:>5} {row['rows_agreeing_with_eager_fp32']:>5.2f}"
                )
    for s in sweeps:
        print(f"sweep B={s['batch']} len={s['length']} {s['layout']} BLOCK_T={s['BLOCK_T']:>2} "
              f"warps={s['num_warps']:>2}: {s['us']:7.1f} us {s['GBps']:6.0f} GB/s exact={s['exact']}")  # fmt: skip
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
