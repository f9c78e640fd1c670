"""Fused V-norm + top-k token selection (FlashU V-norm token pruning), one Triton launch.

FlashU prunes image tokens at an early decoder layer by the L2 norm of their value vectors: per row,
keep the `keep` image tokens whose v_proj output has the SMALLEST norm, and return their absolute
sequence positions sorted ascending (the positions are kept for RoPE).

    v: [B, L, C]  (C = n_kv_heads * head_dim, all heads together; last dim contiguous)
    norm[b, j] = fp32(sqrt(sum_c v[b, start_b + j, c]^2)),  j in [0, length)
    out[b]     = sorted(start_b + (the `keep` smallest norms, ties -> lower j))   int64 [B, keep]

Why the sum of squares is accumulated in fp64: the selection is exact (index equality), so every
implementation must produce bit-identical fp32 norms or a near-tie at the cut flips between devices.
An fp32 sum depends on the reduction order; an fp64 sum of bf16/fp16/fp32 squares is exact or
within ~2^-44 relative, so its fp32 rounding is order-independent: the kernel, the CPU reference and
any other faithful implementation agree bit for bit (ties included).

Kernel (grid = [num_chunks, B]): each program reads BLOCK_T tokens x C channels once, writes their
norm bit patterns (non-negative fp32 bits order like int32) to a small workspace and bumps its row's
arrival counter; the last program of a row selects. Selection holds the row's bits in registers:
a radix search (2 bits per step, starting below the bits that the row's min and max share) finds
the threshold T = the keep-th smallest bits; then one packed int32 scan gives, in index order,
#(bits < T) and #(bits == T) before each token, which is its output slot. No sort, no second kernel
(the counters need a 4*B-byte memset when a row spans several programs).

Bytes moved: B*length*C*itemsize read of v, + B*length*4 written and re-read (workspace, L2) + B*keep*8
written. Measured numbers: docs/KERNELS.md.
"""

from __future__ import annotations

import torch

try:  # Triton is optional: the CPU path (and CI) runs the pure-torch reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

__all__ = ["MAX_LENGTH", "vnorm_topk", "vnorm_topk_reference"]

# Selection keeps the whole row in registers and packs two counts into one int32 (16-bit fields).
MAX_LENGTH = 16384
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------------
# Launch configs keyed on shape (see _config for the measured numbers behind them).
# --------------------------------------------------------------------------------------------------
def _config(length: int, c: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps) for a row of `length` tokens of `c` channels."""
    block_n = triton.next_power_of_2(length)
    # The selecting program holds block_n keys: 8 per thread keeps the kernel at ~47 registers
    # (ptxas, sm_90a), so phase 1 still runs 2+ programs per SM (16 keys/thread: 108 registers).
    num_warps = max(4, min(32, block_n // 256))
    block_d = min(triton.next_power_of_2(c), 512)
    # Phase 1: ~32 elements per thread (4 16-byte loads in flight for bf16); small rows -> small tiles,
    # so that one 729-token row still spreads over 46-92 programs. H200 sweep (graph replay, bf16,
    # 7B layout), this config vs the best of BLOCK_T {8..64} x warps {4, 8, 16}: 1x729 9.1 vs 8.9 us,
    # 8x729 11.8 vs 11.7 us, 1x4096 15.2 vs 14.2 us, 8x4096 28.9 vs 26.9 us (BLOCK_T=64, 8 warps).
    block_t = max(1, min(1024 * num_warps // block_d, block_n))
    return block_t, block_d, num_warps


if triton is not None:
    _NAN_BITS = tl.constexpr(0x7FC00000)  # canonical NaN: NaN norms tie (torch.sort: last, stable)
    _PAD_BITS = tl.constexpr(0x7FFFFFFF)  # above any canonical norm: padding is never kept

    @triton.jit
    def _add2(a0, b0, a1, b1):
        return a0 + a1, b0 + b1

    @triton.jit
    def _min_max(lo0, hi0, lo1, hi1):
        return tl.minimum(lo0, lo1), tl.maximum(hi0, hi1)

    @triton.jit
    def _threshold(key, real, keep):
        """(T, #(key < T)) for T = the smallest key with #(key <= T) >= keep.

        Radix search on the bits, 2 per step: three counts per step, packed into two int32s (16-bit
        fields, as #keys <= 16384) and summed in one reduction. It starts below the highest bit where
        min and max differ (norms of one row share their top bits: ~12 steps instead of 16).
        """
        lo, hi = tl.reduce((key, tl.where(real, key, 0)), 0, _min_max)
        top = ((lo ^ hi).to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127  # >= highest set bit
        s0 = tl.maximum(tl.minimum(top | 1, 29), -1)  # odd: 2-bit steps at s0, s0 - 2, ..., 1, then bit 0
        prefix = lo & ~tl.where(s0 >= 29, 0x7FFFFFFF, (1 << (s0 + 2)) - 1)  # bits above s0 + 1: shared
        n_lt = lo * 0  # #(key < prefix), tracked so that no extra reduction is needed at the end
        s = s0
        while s >= 1:  # not `for i in range(tensor)`: triton 3.6's interpreter rejects it
            low = (1 << s) - 1
            le0 = (key <= (prefix | low)).to(tl.int32)
            le1 = (key <= (prefix | (1 << s) | low)).to(tl.int32)
            le2 = (key <= (prefix | (2 << s) | low)).to(tl.int32)
            c01, c2 = tl.reduce((le0 | (le1 << 16), le2), 0, _add2)
            c0, c1 = c01 & 0xFFFF, c01 >> 16
            digit = (c0 < keep).to(tl.int32) + (c1 < keep).to(tl.int32) + (c2 < keep).to(tl.int32)
            n_lt = tl.where(digit == 1, c0, tl.where(digit == 2, c1, tl.where(digit == 3, c2, n_lt)))
            prefix = prefix | (digit << s)
            s -= 2
        c = tl.sum((key <= prefix).to(tl.int32), axis=0)
        n_lt = tl.where(c < keep, c, n_lt)
        return prefix | (c < keep).to(tl.int32), n_lt

    # Values that vary per call are not specialized (no recompiles); the strides are (alignment).
    @triton.jit(do_not_specialize=["start", "seq_len", "length", "keep"])
    def _vnorm_topk_kernel(
        v_ptr,  # [B, L, C], last dim contiguous
        start_rows_ptr,  # [B] int64, read only when HAS_START_ROWS
        ws_ptr,  # [B, BLOCK_N] int32 scratch: fp32 norm bits (row stride BLOCK_N: 16 B loads)
        count_ptr,  # [B] int32 arrival counters, zeroed; read only when SPLIT
        out_ptr,  # [B, keep] int64
        start,
        seq_len,
        length,
        keep,
        stride_b,
        stride_l,
        C: tl.constexpr,
        HAS_START_ROWS: tl.constexpr,
        SPLIT: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        chunk = tl.program_id(0)
        b = tl.program_id(1)
        if HAS_START_ROWS:
            start = tl.load(start_rows_ptr + b)
        valid = (start >= 0) & (start <= seq_len - length)  # a bad tensor start yields -1s

        # Phase 1: norms of this program's BLOCK_T tokens.
        j = chunk * BLOCK_T + tl.arange(0, BLOCK_T)
        tok_ok = tl.where(valid, j < length, False)  # where: `valid` may be a python bool
        rows = v_ptr + b.to(tl.int64) * stride_b + (start + j).to(tl.int64) * stride_l
        acc = tl.zeros([BLOCK_T], dtype=tl.float64)
        for d0 in tl.static_range(0, C, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            if C % BLOCK_D == 0:
                mask = tok_ok[:, None]
            else:
                mask = tok_ok[:, None] & (d < C)[None, :]
            x = tl.load(rows[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float64)
            acc += tl.sum(x * x, axis=1)
        norm = tl.sqrt(acc).to(tl.float32)  # fp64 sqrt is IEEE round-to-nearest
        bits = norm.to(tl.int32, bitcast=True)
        bits = tl.where(norm != norm, _NAN_BITS, bits)
        ws_row = ws_ptr + b.to(tl.int64) * BLOCK_N
        tl.store(ws_row + j, bits, mask=j < length)
        tl.debug_barrier()  # all threads' stores precede the release below

        is_last = True
        if SPLIT:
            arrived = tl.atomic_add(count_ptr + b, 1, sem="acq_rel", scope="gpu")
            is_last = arrived == tl.num_programs(0) - 1
        if is_last:
            # Phase 2: select. .cg reads L2, where the other programs' norms are visible.
            n = tl.arange(0, BLOCK_N)
            key = tl.load(ws_row + n, cache_modifier=".cg")  # unmasked: 16 B loads; row is BLOCK_N
            key = tl.where(n < length, key, _PAD_BITS)
            prefix, n_lt = _threshold(key, n < length, keep)
            lt = key < prefix
            eq = key == prefix
            n_tie = keep - n_lt  # ties kept, lowest index first
            scan = tl.cumsum(lt.to(tl.int32) | (eq.to(tl.int32) << 16), axis=0)
            lt_before = (scan & 0xFFFF) - lt.to(tl.int32)
            eq_before = (scan >> 16) - eq.to(tl.int32)
            kept = lt | (eq & (eq_before < n_tie))
            slot = lt_before + tl.minimum(eq_before, n_tie)
            pos = tl.where(valid, start + n.to(tl.int64), -1)
            tl.store(out_ptr + b.to(tl.int64) * keep + slot, pos, mask=kept)


def _launch(
    v: torch.Tensor,
    start_rows: torch.Tensor | None,
    start: int,
    length: int,
    keep: int,
    block_t: int | None = None,
    num_warps: int | None = None,
    traceable: bool = False,
) -> torch.Tensor:
    """Allocate and launch the Triton kernel (any device Triton drives, or the interpreter).

    block_t / num_warps override the shape-keyed config (tests, `harness kernels --sweep`).
    traceable: launch through wrap_triton (inside the op, so torch.compile sees the kernel); called
    directly that goes through a higher-order op (100+ us of host time on an H200 machine) and
    rejects the interpreter.
    """
    batch, seq_len, c = v.shape
    out = torch.empty((batch, keep), dtype=torch.int64, device=v.device)
    if batch == 0:
        return out
    cfg_t, block_d, cfg_warps = _config(length, c)
    block_t, num_warps = block_t or cfg_t, num_warps or cfg_warps
    num_chunks = triton.cdiv(length, block_t)
    block_n = triton.next_power_of_2(length)
    ws = torch.empty((batch, block_n), dtype=torch.int32, device=v.device)
    # Arrival counters must start at zero; a single-program row needs none (one launch, no memset).
    count = torch.zeros(batch, dtype=torch.int32, device=v.device) if num_chunks > 1 else ws
    kernel = torch.library.wrap_triton(_vnorm_topk_kernel) if traceable else _vnorm_topk_kernel
    kernel[(num_chunks, batch)](
        v,
        v if start_rows is None else start_rows,
        ws,
        count,
        out,
        start,
        seq_len,
        length,
        keep,
        v.stride(0),
        v.stride(1),
        C=c,
        HAS_START_ROWS=start_rows is not None,
        SPLIT=num_chunks > 1,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return out


# --------------------------------------------------------------------------------------------------
# Pure-torch reference (any device): the specification the kernel is tested against.
# --------------------------------------------------------------------------------------------------
def _reference(v: torch.Tensor, start_rows: torch.Tensor | None, start: int, length: int, keep: int) -> torch.Tensor:
    batch, seq_len, _ = v.shape
    if start_rows is None:
        span = v[:, start : start + length]  # [B, length, C]
        offset = torch.full((batch, 1), start, dtype=torch.int64, device=v.device)
        valid = None
    else:
        valid = (start_rows >= 0) & (start_rows <= seq_len - length)
        offset = start_rows[:, None]
        idx = (offset + torch.arange(length, device=v.device)).clamp(0, max(seq_len - 1, 0))
        span = v[torch.arange(batch, device=v.device)[:, None], idx]
    norm = span.double().square().sum(-1).sqrt().float()  # [B, length], see module docstring
    order = torch.sort(norm, dim=-1, stable=True).indices[:, :keep]  # NaN last, ties by index
    out = torch.sort(order, dim=-1).values + offset
    return out if valid is None else torch.where(valid[:, None], out, -1)


def _vnorm_topk_impl(
    v: torch.Tensor, start_rows: torch.Tensor | None, start: int, length: int, keep: int
) -> torch.Tensor:
    if v.device.type == "cpu" or triton is None:
        return _reference(v, start_rows, start, length, keep)
    return _launch(v, start_rows, start, length, keep, traceable=True)


# The op takes an int start and an optional per-row tensor rather than always a tensor: building a
# (B,) tensor from an int would cost an extra launch per call on the GPU.
if triton is not None:
    # triton_op: torch.compile sees the kernel (no opaque call) and the fn doubles as the fake impl.
    _vnorm_topk_op = torch.library.triton_op("flashu::vnorm_topk", mutates_args=())(_vnorm_topk_impl)
else:
    # Without triton, triton_op would log a warning at import; the CPU path needs no kernel anyway.
    _vnorm_topk_op = torch.library.custom_op("flashu::vnorm_topk", mutates_args=())(_vnorm_topk_impl)
    _vnorm_topk_op.register_fake(_vnorm_topk_impl)


# --------------------------------------------------------------------------------------------------
# Public API: validation (names the argument, the value and the allowed range), then the op.
# --------------------------------------------------------------------------------------------------
def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value} is out of range: allowed [{lo}, {hi}]")
    return value


def _check(v: torch.Tensor, start: int | torch.Tensor, length: int, keep: int) -> tuple[torch.Tensor | None, int]:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"v must be a torch.Tensor, got {type(v).__name__}")
    if v.dim() != 3:
        raise ValueError(f"v must have rank 3 (B, L, KV*D), got rank {v.dim()} shape {tuple(v.shape)}")
    if v.dtype not in _DTYPES:
        raise TypeError(f"v has dtype {v.dtype}; supported: float32, bfloat16, float16")
    batch, seq_len, c = v.shape
    if c < 1:
        raise ValueError(f"v's last dim (KV*D) must be >= 1, got shape {tuple(v.shape)}")
    if v.stride(-1) != 1 and c > 1:
        raise ValueError(
            f"v's last dim must be contiguous (stride 1), got strides {v.stride()}; "
            "pass v.contiguous() explicitly (no silent copies here)"
        )
    _check_int("length", length, 1, min(seq_len, MAX_LENGTH))
    _check_int("keep", keep, 1, length)
    if isinstance(start, torch.Tensor):
        if start.shape != (batch,):
            raise ValueError(f"start tensor must have shape ({batch},), got {tuple(start.shape)}")
        if start.dtype != torch.int64:
            raise TypeError(f"start tensor must have dtype torch.int64, got {start.dtype}")
        if start.device != v.device:
            raise ValueError(f"start tensor is on {start.device} but v is on {v.device}")
        return start, 0
    return None, _check_int("start", start, 0, seq_len - length)


def vnorm_topk(v: torch.Tensor, start: int | torch.Tensor, length: int, keep: int) -> torch.Tensor:
    """Positions of the `keep` image tokens with the smallest V norm, per row, sorted ascending.

    v: [B, L, KV*D] (fp32/bf16/fp16, last dim contiguous); image tokens are
    [start, start + length) with start an int or an int64 tensor [B] (a row whose tensor start is
    out of range gets -1s: checking it would need a host sync). Returns int64 [B, keep].

    >>> v = torch.tensor([[[3.0], [1.0], [2.0], [1.0], [0.0]]])
    >>> vnorm_topk(v, start=1, length=3, keep=2)
    tensor([[1, 3]])
    """
    start_rows, start_int = _check(v, start, length, keep)
    return torch.ops.flashu.vnorm_topk(v, start_rows, start_int, length, keep)


def vnorm_topk_reference(v: torch.Tensor, start: int | torch.Tensor, length: int, keep: int) -> torch.Tensor:
    """Pure-torch twin of `vnorm_topk` (same checks, same results bit for bit, any device).

    >>> vnorm_topk_reference(torch.ones(1, 4, 2), start=0, length=4, keep=2)
    tensor([[0, 1]])
    """
    start_rows, start_int = _check(v, start, length, keep)
    return _reference(v, start_rows, start_int, length, keep)
