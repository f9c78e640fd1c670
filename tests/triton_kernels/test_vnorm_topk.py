"""vnorm_topk: the op and its reference against an independent numpy oracle; the Triton kernel under
TRITON_INTERPRET=1 (CPU) and on CUDA against the reference; torch.compile; every error message."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from triton_kernels import vnorm_topk, vnorm_topk_reference
from triton_kernels.vnorm_topk import MAX_LENGTH, SELECTS

REPO = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()


def oracle(v: torch.Tensor, starts: list[int], length: int, keep: int) -> torch.Tensor:
    """Independent spec: numpy fp64 sums, fp32 norms, lexsort (NaN last, ties by index)."""
    x = v.double().cpu().numpy()  # exact upcast of every supported dtype
    seq_len = x.shape[1]
    rows = []
    for b, s in enumerate(starts):
        if s < 0 or s + length > seq_len:
            rows.append([-1] * keep)
            continue
        span = x[b, s : s + length]
        norm = np.sqrt((span * span).sum(-1)).astype(np.float32)
        order = np.lexsort((np.arange(length), norm))
        rows.append(sorted(int(j) + s for j in order[:keep]))
    return torch.tensor(rows, dtype=torch.int64).reshape(len(starts), keep)


@st.composite
def cases(draw: st.DrawFn) -> tuple[torch.Tensor, int, int, int]:
    """Random (v, start, length, keep) with duplicated token rows (ties), odd sizes and strides."""
    batch = draw(st.integers(1, 3))
    seq_len = draw(st.integers(1, 48))
    c = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from(DTYPES))
    length = draw(st.integers(1, seq_len))
    start = draw(st.integers(0, seq_len - length))
    keep = draw(st.integers(1, length))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    pad = draw(st.sampled_from([0, 3]))  # pad > 0: v is a strided slice of a wider tensor
    wide = torch.randn(batch, seq_len, c + pad, generator=gen) * scale
    v = wide.to(dtype)[..., pad:]
    eps = torch.finfo(dtype).eps
    for _ in range(draw(st.integers(0, 6))):  # ties: copy one token's vector onto another
        src, dst = draw(st.integers(0, seq_len - 1)), draw(st.integers(0, seq_len - 1))
        v[:, dst] = v[:, src]
        if draw(st.booleans()):  # near tie: one component one ulp up; fp32 norms may or may not tie
            v[:, dst, 0] *= 1 + eps
    if draw(st.booleans()):
        v[:, draw(st.integers(0, seq_len - 1))] = 0  # zero norm
    return v, start, length, keep


@settings(deadline=None, max_examples=80)
@given(cases())
def test_int_start_matches_oracle(case: tuple[torch.Tensor, int, int, int]) -> None:
    v, start, length, keep = case
    want = oracle(v, [start] * v.shape[0], length, keep)
    assert torch.equal(vnorm_topk_reference(v, start, length, keep), want)
    assert torch.equal(vnorm_topk(v, start, length, keep), want)


@settings(deadline=None, max_examples=30)
@given(cases())
def test_every_keep_matches_oracle(case: tuple[torch.Tensor, int, int, int]) -> None:
    # Sweeping keep over 1..length checks the whole order, so (near) ties anywhere are tested.
    v, start, length, _ = case
    for keep in range(1, length + 1):
        assert torch.equal(vnorm_topk(v, start, length, keep), oracle(v, [start] * v.shape[0], length, keep))


@settings(deadline=None, max_examples=40)
@given(cases(), st.data())
def test_tensor_start_matches_oracle(case: tuple[torch.Tensor, int, int, int], data: st.DataObject) -> None:
    v, _, length, keep = case
    seq_len = v.shape[1]
    # Out-of-range rows included: they must come back as -1s.
    starts = [data.draw(st.integers(-2, seq_len - length + 2)) for _ in range(v.shape[0])]
    start = torch.tensor(starts, dtype=torch.int64)
    want = oracle(v, starts, length, keep)
    assert torch.equal(vnorm_topk_reference(v, start, length, keep), want)
    assert torch.equal(vnorm_topk(v, start, length, keep), want)


def test_nan_and_inf_sort_last() -> None:
    v = torch.rand(2, 12, 8) + 0.5
    v[0, 3, 1] = float("nan")
    v[0, 5, 0] = float("inf")
    v[1, 2] = float("nan")
    v[1, 7, 4] = float("-inf")
    for keep in range(1, 13):
        got = vnorm_topk(v, 0, 12, keep)
        assert torch.equal(got, oracle(v, [0, 0], 12, keep))
    assert 3 not in vnorm_topk(v, 0, 12, 11)[0].tolist()  # NaN is the largest norm


def test_example_from_docstring() -> None:
    v = torch.tensor([[[3.0], [1.0], [2.0], [1.0], [0.0]]])
    assert vnorm_topk(v, start=1, length=3, keep=2).tolist() == [[1, 3]]  # tie: both 1.0 kept


@pytest.mark.parametrize("start", [5, "tensor"])
def test_compiles_without_graph_break(start: int | str) -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    v = torch.randn(2, 40, 24, dtype=torch.bfloat16)
    s = torch.tensor([5, 9]) if start == "tensor" else start

    def f(v: torch.Tensor, s: int | torch.Tensor) -> torch.Tensor:
        return vnorm_topk(v * 2, s, 30, 11) + 1

    counter = CompileCounterWithBackend("aot_eager")
    got = torch.compile(f, fullgraph=True, backend=counter)(v, s)
    assert torch.equal(got, vnorm_topk_reference(v * 2, s, 30, 11) + 1)
    assert counter.frame_count == 1


def test_opcheck() -> None:
    v = torch.randn(2, 20, 16, dtype=torch.float16)
    op = torch.ops.flashu.vnorm_topk.default
    torch.library.opcheck(op, (v, None, 3, 15, 6))
    torch.library.opcheck(op, (v, torch.tensor([3, 30]), 0, 15, 6))


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True, text=True, timeout=300
    )


def test_import_needs_no_triton() -> None:
    proc = _run_python("""
        import sys
        sys.modules["triton"] = None  # any `import triton` now raises ImportError
        import torch, triton_kernels
        print(triton_kernels.vnorm_topk(torch.tensor([[[2.0], [1.0], [3.0]]]), 0, 3, 2).tolist())
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[[0, 1]]"
    assert "Triton" not in proc.stderr


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernel_under_interpreter() -> None:
    # TRITON_INTERPRET is read when @triton.jit runs (module import): hence a fresh interpreter.
    proc = _run_python(
        """
        import torch
        from triton_kernels.vnorm_topk import _launch, _reference, vnorm_topk_launch
        gen = torch.Generator().manual_seed(0)
        n_cases = 0
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for batch, seq_len, c, block_t in [(2, 37, 24, 4), (1, 70, 64, None), (3, 19, 7, 2)]:
                v = torch.randn(batch, seq_len, c + 2, generator=gen).to(dtype)[..., 2:]
                v[:, 5] = v[:, 9]  # ties
                v[:, 11] = v[:, 9]
                v[0, 4] = 0
                v[-1, 6, 0] = float("nan")
                length = seq_len - 4
                for keep in (1, length // 3, length):
                    want = _reference(v, None, 3, length, keep)
                    assert torch.equal(_launch(v, None, 3, length, keep, block_t=block_t), want)
                    assert torch.equal(vnorm_topk_launch(v, 3, length, keep, block_t=block_t), want)  # the public twin
                    rows = torch.tensor([0, 4, -1][:batch])  # -1: out of range
                    want = _reference(v, rows, 0, length, keep)
                    assert torch.equal(_launch(v, rows, 0, length, keep, block_t=block_t), want)
                    n_cases += 2
        # The cached arrival counters served every multi-program row above (batches 2, 1, 3 in turn)
        # and were reset to zero by each row's last program.
        from triton_kernels.vnorm_topk import _COUNTERS
        assert len(_COUNTERS) == 1 and not _COUNTERS[torch.device("cpu")].any()
        print(n_cases)
        """,
        TRITON_INTERPRET="1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "54"


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_histogram_select_under_interpreter() -> None:
    """The tl.histogram threshold searches (every digit size in SELECTS) equal the reference on random rows
    of up to 4096 tokens: key spans of 0 to 31 bits (every step count), long runs of ties at the cut, NaN /
    inf / zero norms. A hypothesis property inside the subprocess, as the interpreter is chosen at
    import. (The radix default is the kernel test above; interpreted, it is ~7x slower per 4096-key row.)"""
    proc = _run_python(
        """
        import torch
        from hypothesis import given, settings
        from hypothesis import strategies as st
        from triton_kernels.vnorm_topk import SELECTS, _launch, _reference

        HIST = sorted(s for s in SELECTS if s != "radix")

        @st.composite
        def rows(draw):
            batch = draw(st.integers(1, 2))
            length = draw(st.one_of(st.integers(1, 64), st.integers(65, 4096)))
            seq_len = length + draw(st.integers(0, 5))
            c = draw(st.integers(1, 24))
            dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
            gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
            e = draw(st.sampled_from([0, 2, 12, 40]))
            scale = 2.0 ** torch.randint(-e, e + 1, (batch, seq_len, 1), generator=gen)
            mode = draw(st.sampled_from(["randn", "ints", "pow2"]))
            if mode == "randn":  # per-token scales 2^-e..2^e: key spans of up to 23 + log2(2e + 1) bits
                x = torch.randn(batch, seq_len, c, generator=gen) * scale
            elif mode == "ints":  # few distinct norms: long runs of ties at the cut
                x = torch.randint(0, draw(st.integers(1, 4)), (batch, seq_len, c), generator=gen).float()
            else:  # power-of-two norms: the threshold's low digits are 0 (the count must carry over them)
                x = torch.zeros(batch, seq_len, c)
                x[..., :1] = scale
            v = x.to(dtype)
            for value in draw(st.lists(st.sampled_from([0.0, float("inf"), float("nan")]), max_size=3)):
                v[:, draw(st.integers(0, seq_len - 1)), 0] = value
            start = draw(st.integers(0, seq_len - length))
            keeps = draw(st.lists(st.integers(1, length), min_size=1, max_size=3))
            return v, start, length, keeps, draw(st.sampled_from(HIST))

        @settings(deadline=None, max_examples=40, database=None)  # the hist selects are options, not the default
        @given(rows())
        def histogram_select_matches_reference(case):
            v, start, length, keeps, select = case
            for keep in keeps:
                want = _reference(v, None, start, length, keep)
                assert torch.equal(_launch(v, None, start, length, keep, select=select), want), (select, keep)

        histogram_select_matches_reference()
        print(HIST)
        """,
        TRITON_INTERPRET="1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "['hist5', 'hist6', 'hist7', 'hist8']"


# --------------------------------------------------------------------------------------------------
# Errors: each names the argument, the value and the allowed range.
# --------------------------------------------------------------------------------------------------
V = torch.zeros(2, 10, 4)
ERRORS = [
    ((V.numpy(), 0, 4, 2), TypeError, r"v must be a torch.Tensor, got ndarray"),
    ((V[0], 0, 4, 2), ValueError, r"v must have rank 3 \(B, L, KV\*D\), got rank 2 shape \(10, 4\)"),
    ((V.double(), 0, 4, 2), TypeError, r"v has dtype torch.float64; supported: float32, bfloat16, float16"),
    ((V.int(), 0, 4, 2), TypeError, r"v has dtype torch.int32"),
    ((V[..., :0], 0, 4, 2), ValueError, r"last dim \(KV\*D\) must be >= 1, got shape \(2, 10, 0\)"),
    ((V.transpose(1, 2).contiguous().transpose(1, 2), 0, 4, 2), ValueError, r"last dim must be contiguous"),
    ((V, 0, 0, 1), ValueError, r"length=0 is out of range: allowed \[1, 10\]"),
    ((V, 0, 11, 1), ValueError, r"length=11 is out of range: allowed \[1, 10\]"),
    ((torch.zeros(1, MAX_LENGTH + 1, 1), 0, MAX_LENGTH + 1, 1), ValueError, rf"allowed \[1, {MAX_LENGTH}\]"),
    ((V, 0, 4.0, 2), TypeError, r"length must be an int, got float 4.0"),
    ((V, 0, 4, 0), ValueError, r"keep=0 is out of range: allowed \[1, 4\]"),
    ((V, 0, 4, 5), ValueError, r"keep=5 is out of range: allowed \[1, 4\]"),
    ((V, 0, 4, True), TypeError, r"keep must be an int, got bool True"),
    ((V, -1, 4, 2), ValueError, r"start=-1 is out of range: allowed \[0, 6\]"),
    ((V, 7, 4, 2), ValueError, r"start=7 is out of range: allowed \[0, 6\]"),
    ((V, 1.5, 4, 2), TypeError, r"start must be an int, got float 1.5"),
    ((V, torch.zeros(3, dtype=torch.int64), 4, 2), ValueError, r"start tensor must have shape \(2,\), got \(3,\)"),
    ((V, torch.zeros(2, 1, dtype=torch.int64), 4, 2), ValueError, r"must have shape \(2,\), got \(2, 1\)"),
    ((V, torch.zeros(2, dtype=torch.int32), 4, 2), TypeError, r"must have dtype torch.int64, got torch.int32"),
    (
        (V, torch.zeros(2, dtype=torch.int64, device="meta"), 4, 2),
        ValueError,
        r"start tensor is on meta but v is on cpu",
    ),
]


def test_direct_launch_names_a_bad_search() -> None:
    from triton_kernels.vnorm_topk import vnorm_topk_launch

    with pytest.raises(ValueError, match=r"select='hist9' is invalid: allowed one of \['hist5', 'hist6', 'hist7', "
                                         r"'hist8', 'radix'\]"):
        vnorm_topk_launch(V, 0, 4, 2, select="hist9")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("length", [1, 729, 1024, 1025, 4096, 16384])
def test_short_rows_take_the_histogram_search_with_8_warps(length: int) -> None:
    """The measured split (docs/KERNELS.md): 5-bit histograms with 8 warps up to 1024 tokens, radix beyond."""
    from triton_kernels.vnorm_topk import SELECTS, launch_config

    block_t, block_d, num_warps, select = launch_config(length, 512)
    assert select in SELECTS and select == ("hist5" if length <= 1024 else "radix")
    assert num_warps == 8 if length <= 1024 else 4 <= num_warps <= 32
    assert block_t <= max(8, length) and block_d == 128


@pytest.mark.parametrize("fn", [vnorm_topk, vnorm_topk_reference])
@pytest.mark.parametrize(("args", "exc", "match"), ERRORS)
def test_errors(fn: object, args: tuple, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        fn(*args)  # type: ignore[operator]


# --------------------------------------------------------------------------------------------------
# CUDA: the compiled kernel at realistic sizes (runs on the lent GPU; skipped in CI).
# --------------------------------------------------------------------------------------------------
def cuda(fn: object) -> object:
    return pytest.mark.gpu(pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")(fn))


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "length", "c"), [(1, 729, 512), (8, 4096, 256), (2, 8192, 512), (1, 16384, 256)])
def test_cuda_matches_reference(dtype: torch.dtype, batch: int, length: int, c: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(length + c)
    # A fused qkv output: v is a strided slice, rows of stride 3C; 37 text tokens before the image.
    qkv = torch.randn(batch, length + 50, 3 * c, device="cuda", dtype=dtype, generator=gen)
    v = qkv[..., 2 * c :]
    v[:, 40:50] = v[:, 60:70]  # ties
    for keep in (1, length // 2, length):
        want = vnorm_topk_reference(v, 37, length, keep)
        assert torch.equal(vnorm_topk(v, 37, length, keep), want)
    rows = torch.arange(batch, device="cuda") * 3 + 37
    assert torch.equal(vnorm_topk(v, rows, length, length // 2), vnorm_topk_reference(v, rows, length, length // 2))


@cuda
@pytest.mark.parametrize("select", list(SELECTS))
@pytest.mark.parametrize(("batch", "length", "c"), [(1, 729, 512), (8, 4096, 256), (1, 16384, 256)])
def test_cuda_every_select_matches_reference(select: str, batch: int, length: int, c: int) -> None:
    """Each threshold search, compiled, at realistic sizes: ties, a ~28-bit key span (5 tokens scaled by 2^-10
    to 2^10) and power-of-two norms (thresholds whose low digits are 0)."""
    from triton_kernels.vnorm_topk import _launch

    gen = torch.Generator(device="cuda").manual_seed(length + c)
    v = torch.randn(batch, length + 40, c, device="cuda", dtype=torch.bfloat16, generator=gen)
    v[:, 40:50] = v[:, 60:70]  # ties
    v[:, 80:85] *= 2.0 ** torch.arange(-10, 15, 5, device="cuda")[:, None]
    v[:, 100:140] = 0
    v[:, 100:140, 0] = 2.0 ** torch.randint(-3, 6, (40,), device="cuda", generator=gen)
    for keep in (1, 30, length // 2, length):
        want = vnorm_topk_reference(v, 37, length, keep)
        assert torch.equal(_launch(v, None, 37, length, keep, select=select), want), keep


@cuda
@settings(deadline=None, max_examples=25)
@given(
    st.lists(
        st.tuples(st.integers(1, 9), st.integers(1, 5000), st.sampled_from([64, 256, 512])), min_size=1, max_size=4
    ),
    st.integers(0, 2**31 - 1),
)
def test_cuda_counters_reused_across_calls(calls: list[tuple[int, int, int]], seed: int) -> None:
    """Calls of any batch and length in turn share the cached counters; each leaves them at zero."""
    from triton_kernels.vnorm_topk import _COUNTERS

    gen = torch.Generator(device="cuda").manual_seed(seed)
    for batch, length, c in calls:
        v = torch.randn(batch, length + 3, c, device="cuda", dtype=torch.bfloat16, generator=gen)
        keep = int(torch.randint(1, length + 1, (1,), generator=gen, device="cuda"))
        assert torch.equal(vnorm_topk(v, 3, length, keep), vnorm_topk_reference(v, 3, length, keep))
    assert all(not buf.any() for buf in _COUNTERS.values())


@cuda
@pytest.mark.parametrize("cached", [True, False])
def test_cuda_graph_replay_counters(cached: bool) -> None:
    """Graph replay with the counters cached before capture (no memset node), or not cached (a captured
    memset): replays interleaved with eager calls stay exact."""
    from triton_kernels.vnorm_topk import _COUNTERS

    v = torch.randn(3, 4200, 256, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        vnorm_topk(v, 50, 4096, 1000)  # warm up: JIT (and the counter cache)
    torch.cuda.current_stream().wait_stream(side)
    if not cached:
        _COUNTERS.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = vnorm_topk(v, 50, 4096, 1000)
    assert (torch.device("cuda", v.device.index) in _COUNTERS) == cached
    for _ in range(3):
        v.copy_(torch.randn_like(v))
        graph.replay()
        assert torch.equal(out, vnorm_topk_reference(v, 50, 4096, 1000))
        assert torch.equal(vnorm_topk(v[:2], 7, 4000, 99), vnorm_topk_reference(v[:2], 7, 4000, 99))


@cuda
def test_cuda_graph_and_inductor() -> None:
    v = torch.randn(4, 800, 512, device="cuda", dtype=torch.bfloat16)
    want = vnorm_topk_reference(v, 20, 729, 364)
    compiled = torch.compile(lambda v: vnorm_topk(v, 20, 729, 364), fullgraph=True)
    assert torch.equal(compiled(v), want)
    vnorm_topk(v, 20, 729, 364)  # warm up (JIT) before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = vnorm_topk(v, 20, 729, 364)
    v.copy_(torch.randn_like(v))
    graph.replay()
    graph.replay()  # counters restart from zero on every replay
    assert torch.equal(out, vnorm_topk_reference(v, 20, 729, 364))
