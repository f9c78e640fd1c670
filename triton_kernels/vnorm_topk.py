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

Kernel (grid = [num_chunks, B]): each program reads BLOCK_T tokens x C channels once (fp64 squares
summed elementwise over 128-channel chunks, one cross-lane reduction per tile), writes their norm bit
patterns (non-negative fp32 bits order like int32) to a small workspace and bumps its row's arrival
counter; the last program of a row stores the counter back to 0 and selects. Selection holds the row's
keys in registers as offsets from the row's min: a radix search (3 bits per step, ~7 steps for a row
of norms; 7 counts per step from one-hot nibbles in one reduction) finds the threshold T = the
keep-th smallest key; then one packed int32 scan gives, in index order, #(bits < T) and #(bits == T)
before each token, which is its output slot. The histogram threshold searches (`SELECTS`: "hist5" to
"hist8") count 5- to 8-bit digits per step with tl.histogram instead; rows of <= 1024 tokens use
"hist5", measured faster there (`_select`, docs/KERNELS.md). No sort, no second kernel, and no memset: the counters
are a cached per-device buffer that every launch leaves zeroed (see _counters; launches on one
device must be stream-ordered, as on one stream or inside one graph).

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

__all__ = ["MAX_LENGTH", "SELECTS", "launch_config", "vnorm_topk", "vnorm_topk_launch", "vnorm_topk_reference"]

# Selection keeps the whole row in registers and packs two counts into one int32 (16-bit fields).
MAX_LENGTH = 16384
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------------
# Launch configs keyed on shape (see _config for the measured numbers behind them).
# --------------------------------------------------------------------------------------------------
def _config(length: int, c: int) -> tuple[int, int, int, str]:
    """(BLOCK_T, BLOCK_D, num_warps, threshold search) for a row of `length` tokens of `c` channels."""
    block_n = triton.next_power_of_2(length)
    select = _select(length)
    # The selecting program is issue-bound (one SM for the whole row): fewer warps mean fewer
    # per-thread reduction shuffles per radix step. 16 keys per thread: 118 registers (ptxas sm_90a),
    # still the fastest at 4096 tokens; 32 per thread (4 warps) spills into 220 registers. Rows of
    # <= 1024 tokens take the histogram search (_select), fastest there with 8 warps.
    num_warps = 8 if select != "radix" else max(4, min(32, block_n // 512))
    # Phase 1 reads 128-channel chunks (16 lanes x 8 bf16 per token row) and sums squares elementwise
    # over the chunks: 64 tokens x 128 channels per 8 warps = 32 elements per thread per chunk. Rows of
    # <= 1024 tokens use 8-token tiles, so that one row still spreads over ~90 programs.
    block_d = min(triton.next_power_of_2(c), 128)
    block_t = 8 if block_n <= 1024 else 1024 * num_warps // block_d
    return min(block_t, block_n), block_d, num_warps, select


if triton is not None:
    _NAN_BITS = tl.constexpr(0x7FC00000)  # canonical NaN: NaN norms tie (torch.sort: last, stable)
    _PAD_BITS = tl.constexpr(0x7FFFFFFF)  # above any canonical norm: padding is never kept

    @triton.jit
    def _add4(a0, b0, c0, d0, a1, b1, c1, d1):
        return a0 + a1, b0 + b1, c0 + c1, d0 + d1

    @triton.jit
    def _min_max(lo0, hi0, lo1, hi1):
        return tl.minimum(lo0, lo1), tl.maximum(hi0, hi1)

    @triton.jit
    def _bit_length(span):
        """bits(span) for span >= 0, from the float's exponent (int -> float may round up: one extra bit)."""
        return tl.maximum(((span.to(tl.float32).to(tl.int32, bitcast=True)) >> 23) - 126, 0)

    @triton.jit
    def _threshold(off, span, keep, BLOCK_N: tl.constexpr):
        """(T, #(off < T)) for T = the smallest offset with #(off <= T) >= keep; off = key - min >= 0.

        Radix search, 3 bits per step: real offsets lie in [0, span], so ceil(bits(span) / 3) steps
        (7 for a row of norms, whose offsets span ~21 bits). Each step counts, for the 7 inner bounds
        of the current range, #(off <= bound) in ONE reduction: per key a one-hot nibble 1 << 4 * digit,
        summed over groups of 8 keys (a nibble holds <= 8), made cumulative by one multiply
        (* 0x11111111), widened to 16-bit fields (two counts per int32: counts <= 16384) and summed
        over the row as 4 int32s. Invariant: #(off < prefix) = n_lt < keep <= #(off < prefix + (8 << s)).
        """
        GS: tl.constexpr = 8 if BLOCK_N >= 8 else BLOCK_N
        s = (_bit_length(span) + 2) // 3 * 3 - 3  # at most one spare step (see _bit_length)
        prefix = span * 0
        n_lt = span * 0
        while s >= 0:  # not `for i in range(tensor)`: triton 3.6's interpreter rejects it
            digit = tl.minimum(tl.maximum((off - prefix) >> s, 0), 7)  # below the range: 0, above: 7
            onehot = 1 << (digit * 4)
            # Nibble 7 (bits 28-31) is never needed: masked off before the prefix multiply, which then
            # cannot carry (each nibble <= 8); int32 wrap-around above bit 28 is harmless.
            h = tl.sum(tl.reshape(onehot, [BLOCK_N // GS, GS]), axis=1) & 0x0FFFFFFF
            cum = h * 0x11111111  # nibble k: #(digit <= k) in the group
            w0 = (cum & 0xF) | ((cum << 12) & 0xF0000)  # c0 | c1 << 16
            w1 = ((cum >> 8) & 0xF) | ((cum << 4) & 0xF0000)  # c2 | c3 << 16
            w2 = ((cum >> 16) & 0xF) | ((cum >> 4) & 0xF0000)  # c4 | c5 << 16
            w3 = (cum >> 24) & 0xF  # c6
            c01, c23, c45, c6 = tl.reduce((w0, w1, w2, w3), 0, _add4)
            c0, c1, c2, c3, c4, c5 = c01 & 0xFFFF, c01 >> 16, c23 & 0xFFFF, c23 >> 16, c45 & 0xFFFF, c45 >> 16
            d = (c0 < keep).to(tl.int32) + (c1 < keep).to(tl.int32) + (c2 < keep).to(tl.int32)
            d += (c3 < keep).to(tl.int32) + (c4 < keep).to(tl.int32) + (c5 < keep).to(tl.int32)
            d += (c6 < keep).to(tl.int32)
            n_lt = tl.where(d == 1, c0, tl.where(d == 2, c1, tl.where(d == 3, c2, tl.where(d == 4, c3, n_lt))))
            n_lt = tl.where(d == 5, c4, tl.where(d == 6, c5, tl.where(d == 7, c6, n_lt)))
            prefix += d << s
            s -= 3
        return prefix, n_lt

    @triton.jit
    def _threshold_hist(off, span, keep, DIGIT_BITS: tl.constexpr):
        """_threshold's (T, #(off < T)), searched DIGIT_BITS bits per step with one tl.histogram per step.

        Digits are clamped, not masked: keys below the current range [prefix, prefix + (NUM_BINS << s))
        count in bin 0 and keys above it (padding included) in the top bin. The running sum of bin k is
        then #(off < prefix + ((k + 1) << s)) over the whole row, the count _threshold's invariant needs,
        and the top bin's is the row's BLOCK_N >= keep, so the chosen digit stays in range. (A mask, which
        tl.histogram has in triton 3.6, costs a compare and, in 3.6's ballot lowering, one more ballot
        per key, and its counts would be relative to the prefix.)
        """
        NUM_BINS: tl.constexpr = 1 << DIGIT_BITS
        s = (_bit_length(span) + DIGIT_BITS - 1) // DIGIT_BITS * DIGIT_BITS - DIGIT_BITS
        prefix = span * 0
        n_lt = span * 0
        bins = tl.arange(0, NUM_BINS)
        while s >= 0:
            digit = tl.minimum(tl.maximum((off - prefix) >> s, 0), NUM_BINS - 1)
            cum = tl.cumsum(tl.histogram(digit, NUM_BINS), axis=0)
            # cum is non-decreasing: ONE max-reduction over (cum << 9 | k + 1) where cum < keep gives both
            # the digit d (= #bins with cum < keep) and #(off < prefix + (d << s)) = cum[d - 1]
            # (counts <= 16384 and d <= 256 fit in 24 bits).
            found = tl.max(tl.where(cum < keep, (cum << 9) | (bins + 1), 0), axis=0)
            d = found & 0x1FF
            n_lt = tl.where(d > 0, found >> 9, n_lt)
            prefix += d << s
            s -= DIGIT_BITS
        return prefix, n_lt

    # Values that vary per call are not specialized (no recompiles); the strides are (alignment).
    @triton.jit(do_not_specialize=["start", "seq_len", "length", "keep"])
    def _vnorm_topk_kernel(
        v_ptr,  # [B, L, C], last dim contiguous
        start_rows_ptr,  # [B] int64, read only when HAS_START_ROWS
        ws_ptr,  # [B, BLOCK_N] int32 scratch: fp32 norm bits (row stride BLOCK_N: 16 B loads)
        count_ptr,  # [B] int32 arrival counters, zero on entry and on exit; used only when SPLIT
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
        HIST_BITS: tl.constexpr,  # 0: _threshold (radix, the default); else _threshold_hist's digit bits
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
        # Squares accumulate elementwise over the C / BLOCK_D chunks, then ONE reduction over the row:
        # the cross-lane fp64 shuffles are paid once per tile, not once per chunk.
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float64)
        for d0 in tl.static_range(0, C, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            if C % BLOCK_D == 0:
                mask = tok_ok[:, None]
            else:
                mask = tok_ok[:, None] & (d < C)[None, :]
            x = tl.load(rows[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float64)
            acc += x * x
        norm = tl.sqrt(tl.sum(acc, axis=1)).to(tl.float32)  # fp64 sqrt is IEEE round-to-nearest
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
            if SPLIT:
                # Every program of the row has arrived: reset for the next launch (stream order makes
                # it visible there), so the counters never need a memset.
                tl.store(count_ptr + b, 0)
            # Phase 2: select. .cg reads L2, where the other programs' norms are visible.
            n = tl.arange(0, BLOCK_N)
            key = tl.load(ws_row + n, cache_modifier=".cg")  # unmasked: 16 B loads; row is BLOCK_N
            key = tl.where(n < length, key, _PAD_BITS)
            lo, hi = tl.reduce((key, tl.where(n < length, key, 0)), 0, _min_max)
            off = key - lo  # >= 0 (keys are non-negative), padding above every real key
            if HIST_BITS == 0:
                t_off, n_lt = _threshold(off, hi - lo, keep, BLOCK_N)
            else:
                t_off, n_lt = _threshold_hist(off, hi - lo, keep, HIST_BITS)
            lt = off < t_off
            eq = off == t_off
            n_tie = keep - n_lt  # ties kept, lowest index first
            scan = tl.cumsum(lt.to(tl.int32) | (eq.to(tl.int32) << 16), axis=0)
            lt_before = (scan & 0xFFFF) - lt.to(tl.int32)
            eq_before = (scan >> 16) - eq.to(tl.int32)
            kept = lt | (eq & (eq_before < n_tie))
            slot = lt_before + tl.minimum(eq_before, n_tie)
            pos = tl.where(valid, start + n.to(tl.int64), -1)
            tl.store(out_ptr + b.to(tl.int64) * keep + slot, pos, mask=kept)


# Threshold searches `_launch(select=...)` offers -> the kernel's HIST_BITS.
SELECTS: dict[str, int] = {"radix": 0, "hist5": 5, "hist6": 6, "hist7": 7, "hist8": 8}


def _select(length: int) -> str:
    """The threshold search for rows of `length` tokens, from `harness kernels --sweep` (H100, docs/KERNELS.md):
    5-bit histograms are 6-19% faster on rows of 729 tokens (fewer, wider steps), the radix search on 4096."""
    return "hist5" if length <= 1024 else "radix"

# Arrival counters per device, zero between launches: the last program of each row stores 0 back.
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, batch: int, tracing: bool) -> torch.Tensor:
    """Zeroed int32 arrival counters for `batch` rows: a cached buffer (no memset launch) when possible.

    The cache is filled outside CUDA-graph capture only (a buffer zeroed inside a capture would be zero
    only once the graph replays). While tracing (torch.compile) or capturing with no buffer large enough
    yet, fresh zeros are returned: correct, at the cost of one memset per call.
    """
    buf = _COUNTERS.get(device)
    if buf is not None and buf.numel() >= batch and not tracing:
        return buf
    if tracing or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return torch.zeros(batch, dtype=torch.int32, device=device)
    buf = torch.zeros(max(batch, 64, 2 * (0 if buf is None else buf.numel())), dtype=torch.int32, device=device)
    _COUNTERS[device] = buf
    return buf


def _is_fake(t: torch.Tensor) -> bool:
    """True while torch.compile / export traces the op (fake or functional tensors, no real storage)."""
    from torch._subclasses.fake_tensor import is_fake

    return torch.compiler.is_compiling() or is_fake(t)


def _launch(
    v: torch.Tensor,
    start_rows: torch.Tensor | None,
    start: int,
    length: int,
    keep: int,
    block_t: int | None = None,
    num_warps: int | None = None,
    traceable: bool = False,
    block_d: int | None = None,
    select: str | None = None,
) -> torch.Tensor:
    """Allocate and launch the Triton kernel (any device Triton drives, or the interpreter).

    block_t / num_warps / block_d override the shape-keyed config, and select (a key of SELECTS) the
    length-keyed threshold search (tests, `harness kernels --sweep`).
    traceable: launch through wrap_triton (inside the op, so torch.compile sees the kernel); called
    directly that goes through a higher-order op (100+ us of host time on an H200 machine) and
    rejects the interpreter.
    """
    batch, seq_len, c = v.shape
    out = torch.empty((batch, keep), dtype=torch.int64, device=v.device)
    if batch == 0:
        return out
    cfg_t, cfg_d, cfg_warps, cfg_select = _config(length, c)
    block_t, num_warps, block_d = block_t or cfg_t, num_warps or cfg_warps, block_d or cfg_d
    num_chunks = triton.cdiv(length, block_t)
    block_n = triton.next_power_of_2(length)
    ws = torch.empty((batch, block_n), dtype=torch.int32, device=v.device)
    # A single-program row needs no counter.
    count = ws if num_chunks == 1 else _counters(v.device, batch, tracing=traceable and _is_fake(v))
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
        HIST_BITS=SELECTS[select or cfg_select],
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


def launch_config(length: int, channels: int) -> tuple[int, int, int, str]:
    """(BLOCK_T, BLOCK_D, num_warps, threshold search) the op launches with for rows of ``length`` tokens of
    ``channels`` values."""
    return _config(length, channels)


def vnorm_topk_launch(
    v: torch.Tensor,
    start: int,
    length: int,
    keep: int,
    block_t: int | None = None,
    num_warps: int | None = None,
    select: str | None = None,
) -> torch.Tensor:
    """`vnorm_topk` launched directly (not through the custom op), with an explicit launch config and threshold
    search (a key of `SELECTS`; None: the op's, `launch_config`): what kernel sweeps and microbenchmarks time. Same
    checks and results; needs a device Triton drives.
    """
    if select is not None and select not in SELECTS:
        raise ValueError(f"select={select!r} is invalid: allowed one of {sorted(SELECTS)}")
    if triton is None:
        raise RuntimeError("vnorm_topk_launch needs triton (pip install triton)")
    start_rows, start_int = _check(v, start, length, keep)
    return _launch(v, start_rows, start_int, length, keep, block_t, num_warps, select=select)


def vnorm_topk_reference(v: torch.Tensor, start: int | torch.Tensor, length: int, keep: int) -> torch.Tensor:
    """Pure-torch twin of `vnorm_topk` (same checks, same results bit for bit, any device).

    >>> vnorm_topk_reference(torch.ones(1, 4, 2), start=0, length=4, keep=2)
    tensor([[0, 1]])
    """
    start_rows, start_int = _check(v, start, length, keep)
    return _reference(v, start_rows, start_int, length, keep)
