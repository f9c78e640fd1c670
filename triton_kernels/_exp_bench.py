"""TEMPORARY experiment script (deleted before commit): time kernel variants under CUDA-graph replay."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time

import torch
import triton
import triton.language as tl

from harness.kernels import PREFIX, ROTATE_BYTES, copy_gbps, graph_us
from triton_kernels.vnorm_topk import _launch, vnorm_topk_reference

OUT = os.environ.get("OUT", ".")
RESULTS: list[dict] = []


@triton.jit
def _read_kernel(v_ptr, out_ptr, stride_b, stride_l, length, C: tl.constexpr, BLOCK_T: tl.constexpr):
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    j = chunk * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, C)
    rows = v_ptr + b.to(tl.int64) * stride_b + (PREFIX_C + j).to(tl.int64) * stride_l
    x = tl.load(rows[:, None] + d[None, :], mask=(j < length)[:, None], other=0.0).to(tl.float32)
    tl.store(out_ptr + b * length + j, tl.sum(x * x, axis=1), mask=j < length)


PREFIX_C = tl.constexpr(PREFIX)


def read_floor(v: torch.Tensor, length: int, block_t: int, warps: int) -> torch.Tensor:
    out = torch.empty(v.shape[0], length, device=v.device)
    _read_kernel[(triton.cdiv(length, block_t), v.shape[0])](
        v, out, v.stride(0), v.stride(1), length, C=v.shape[2], BLOCK_T=block_t, num_warps=warps
    )
    return out


def copies_for(batch: int, length: int, c: int) -> list[torch.Tensor]:
    shape = (batch, PREFIX + length + 16, c)
    bytes_v = batch * length * c * 2
    base = [torch.randn(shape, device="cuda").to(torch.bfloat16) for _ in range(2)]
    for v in base:
        v[:, PREFIX + 10 : PREFIX + 20] = v[:, PREFIX + 30 : PREFIX + 40]
    n_sets = min(256, max(4, math.ceil(ROTATE_BYTES / bytes_v)))
    return base + [base[i % 2].clone() for i in range(2, n_sets)]


def timed(name: str, shape: tuple, copies: list[torch.Tensor], fn, check: bool, **kw) -> None:
    batch, length, c = shape
    keep = length // 2
    try:
        calls = [functools.partial(fn, x, None, PREFIX, length, keep, **kw) for x in copies]
        ok = None
        if check:
            ok = all(torch.equal(calls[i](), vnorm_topk_reference(copies[i], PREFIX, length, keep)) for i in (0, 1))
            # counter reuse: call again, and at another batch size
            ok = ok and torch.equal(calls[0](), vnorm_topk_reference(copies[0], PREFIX, length, keep))
        us = graph_us(calls, replays=9)
    except Exception as err:  # noqa: BLE001
        print(f"{name} {shape} FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
        return
    gbps = batch * length * c * 2 / us / 1e3
    row = {"name": name, "B": batch, "L": length, "C": c, "us": us, "GBps": gbps, "exact": ok, **kw}
    RESULTS.append(row)
    print(f"{name:<28} B{batch} L{length} C{c} {us:7.2f} us {gbps:6.0f} GB/s exact={ok} {kw}", flush=True)


def main() -> None:
    t0 = time.time()
    copy = copy_gbps()
    print(f"copy {copy:.0f} GB/s", flush=True)
    shapes = [(8, 4096, 512), (8, 4096, 256), (1, 729, 512), (1, 4096, 512), (8, 729, 512)]
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    if which in ("all", "diag"):
        for shape in shapes:
            batch, length, c = shape
            copies = copies_for(*shape)
            timed("old(memset,radix2)", shape, copies, _launch, True, memset=True, SELECT=2)
            timed("old+cached", shape, copies, _launch, True, SELECT=2)
            timed("nibble+cached", shape, copies, _launch, True, SELECT=3)
            timed("noselect", shape, copies, _launch, False, SELECT=0)
            timed("noselect fp32", shape, copies, _launch, False, SELECT=0, ACC64=False)
            for bt, w in ((32, 8), (64, 8), (16, 4)):
                try:
                    us = graph_us([functools.partial(read_floor, x, length, bt, w) for x in copies], replays=9)
                    print(f"read floor BT{bt} w{w} B{batch} L{length} C{c} {us:7.2f} us "
                          f"{batch * length * c * 2 / us / 1e3:6.0f} GB/s", flush=True)
                    RESULTS.append({"name": "read", "B": batch, "L": length, "C": c, "us": us, "bt": bt, "w": w})
                except Exception as err:  # noqa: BLE001
                    print("read floor failed", err)
            dump(copy)
            del copies
    if which in ("all", "sweep"):
        for shape in shapes[:3]:
            c = shape[2]
            copies = copies_for(*shape)
            for w in (4, 8, 16):
                for bt in (8, 16, 32, 64):
                    for bd in (128, min(c, 512)):
                        per_thread = bt * bd // (32 * w)
                        if per_thread > 64 or per_thread < 8 or time.time() - t0 > float(os.environ.get("TLIM", 230)):
                            continue
                        timed("sweep nibble", shape, copies, _launch, bt == 32, block_t=bt, num_warps=w,
                              block_d=bd)
            dump(copy)
            del copies


def dump(copy: float) -> None:
    with open(f"{OUT}/exp.json", "w") as f:
        json.dump({"copy": copy, "rows": RESULTS}, f, indent=1)
    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
