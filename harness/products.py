"""``python -m harness.products``: each product of a decode token or a generation call, timed alone.

    python -m harness.products --task und --preset showo2-7b                    # on a GPU
    python -m harness.products --task gen --preset showo2-1.5b
    python -m harness.products --preset tiny --device cpu --repeats 3           # a check of the variants (CPU)

``harness.profile_und`` and ``profile_gen`` say what each kernel of a path takes; this says what its products could
take, so that a floor share can be split into what the library allows and what the compiled code leaves.

``--task und``: every product a FlashU decode layer runs at one row (q/k/v merged, o, gate/up and down at the kept
FFN width, as views of the full weights like the executors' slices) and the lm_head, as
- ``library``: the bare product ``x @ W.T`` in eager torch (cuBLAS's GEMV on a GPU);
- ``inductor``: the product with what the decode part fuses into it (the RMSNorm before q/k/v, gate/up and the
  lm_head; silu(gate) * up before down and the residual add after it), compiled by inductor with coordinate-descent
  tuning, as the backend compiles its one-row parts (``tune_decode=True``);
- ``inductor-split`` (down only): silu(gate) * up compiled on its own, then the product and the add: whether the
  down product loses bandwidth by re-reading both FFN activations in every one of its programs;
- ``inductor-folded`` (the products after a norm: q/k/v, gate/up, lm_head): ``passes.norm_in_products`` first (the
  backend's ``norm_in_products=True``), so the norm's statistic is summed inside the product's own kernel.
The layer's attention over the KV cache (``--cache-len`` slots, the last 16 unwritten and masked, as a decode step
reads them) is timed the same two ways: ``library``, SDPA as the decode step calls it (the additive mask, grouped KV
heads), and ``inductor``, ``passes.decode_attention`` (the backend's ``decode_attention="reductions"``) compiled as
above; its bytes are the cache's.
Rows give microseconds, the weight bytes, GB/s and the share of the copy bandwidth; the summary adds one token's
layers (the FlashU skip step's depth) and the lm_head into a per-token time per variant, against the token's weight
bytes at the copy bandwidth.

``--task gen``: the products of one trunk layer over a CFG call's image block (2 x the image slot rows): q/k/v, o,
attention over the prefix and the block, gate/up and down at the full and the kept FFN width, each as the library
runs it (cuBLAS, and SDPA for attention). Rows give TFLOP/s and the share of the device's measured peak; the summary
gives a full and a pruned layer's time against the same FLOPs at the peak: the highest floor share these shapes
allow when every product runs at the library's speed and nothing else costs time. The attention is also timed as
the trunk calls it (``masked``: grouped K/V heads and the bool mask that hides the null row's padded prefix, the
backend torch picks), with each SDPA backend forced (``masked-cudnn``, ``masked-efficient``), and without the mask
(``grouped-flash``, ``grouped-cudnn``: what the call could take if the padding were handled elsewhere), and as
FlexAttention with the mask as key padding (``flex``, compiled by ``--backend``), with the mask as a bias made
beforehand (``bias``), as one query row broadcast over the queries (``key-mask``, ``key-bias``) and as one unmasked
call per row over its visible keys (``per-row``); a backend that does not take the call on the device is reported as
not run. ``--sustained-seconds`` replays the full gate/up product for that long and reports its rate at the start and
over the last half: whether the device keeps its clocks through a whole image's work.

On a GPU each time is device time per call: the median over replays of one CUDA graph that calls the product on
enough weight copies to read HBM rather than L2 (``harness.kernels.graph_us``). On the CPU the command checks every
variant against the eager product and reports wall times.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flashu_fx.compiled.part_compiler import PartSettings, compile_graph
from flashu_fx.config import PRESETS, Showo2Config, get_config
from flashu_fx.flashu_config import FlashUConfig
from flashu_fx.layers import rms_norm
from flashu_fx.und_cache import cache_capacity
from harness.arguments import command_parser
from harness.clocks import ClockSampler, nvml_reader
from harness.devices import resolve_device
from harness.floors import peak_tflops
from harness.kernels import capture_graph, graph_us
from harness.kernels import copy_gbps as measure_copy_gbps
from harness.tables import format_table
from passes.decode_attention import decode_attention

ROTATE_BYTES = 256 * 2**20  # weight copies per graph: several times any L2 (H100 50 MB, H200 60 MB)
VARIANTS = {"und": ("library", "inductor", "inductor-split", "inductor-folded"),
            "gen": ("library", "masked", "masked-cudnn", "masked-efficient", "grouped-flash", "grouped-cudnn", "flex",
                    "bias", "per-row", "key-mask", "key-bias")}
# gen attention only: the backend each variant forces (None: torch's own choice), and whether it reads the mask
SDPA_VARIANTS = {"masked": (None, True), "masked-cudnn": ("CUDNN_ATTENTION", True),
                 "masked-efficient": ("EFFICIENT_ATTENTION", True), "grouped-flash": ("FLASH_ATTENTION", False),
                 "grouped-cudnn": ("CUDNN_ATTENTION", False)}
# the variants that hide the null row's padding
MASKED = {*(v for v, (_, masked) in SDPA_VARIANTS.items() if masked), "flex", "bias", "per-row", "key-mask", "key-bias"}
NULL_PROMPT = 8  # gen attention mask: the null row's prompt positions; the rest of its prefix is padding
KINDS = ("norm", "gate_up", "down", "plain", "attention", "decode_attention")
DEFAULT_CACHE_LEN = cache_capacity(780 + 32)  # issue 13's request: a 780-position prompt and 32 new tokens
UNWRITTEN_SLOTS = 16  # decode attention: cache slots past the answer's end, masked as the decode step masks them


@dataclass(frozen=True)
class Product:
    """One product ``out = x @ W.T`` of ``m`` rows, W ``(n, k)`` a view of ``(n_full, k_full)``; or attention.

    ``kind`` says what the decode part fuses with it: "norm" (RMSNorm before: q/k/v, lm_head), "gate_up" (RMSNorm
    before, two weights: gate and up), "down" (silu(gate) * up before, the residual add after), "plain" (o).
    "attention": ``m`` query rows of ``heads`` heads of size ``k`` over ``n`` keys of ``kv_heads`` heads, 2 rows;
    "decode_attention": one query row of ``heads`` heads of size ``k`` over a KV cache of ``n`` slots of ``kv_heads``
    heads (its "weights": the cache's K and V, which each step reads)."""

    name: str
    kind: str
    m: int
    n: int
    k: int
    n_full: int
    k_full: int
    weights: int = 1  # gate_up: 2
    heads: int = 0  # attention only
    kv_heads: int = 0

    def weight_bytes(self, itemsize: int) -> int:
        if self.kind == "decode_attention":
            return 2 * self.kv_heads * self.n * self.k * itemsize
        return 0 if self.kind == "attention" else self.weights * self.n * self.k * itemsize

    def flops(self) -> float:
        if self.kind == "attention":  # 2 rows (cond, null); QK^T and PV
            return 4.0 * 2 * self.m * self.n * self.heads * self.k
        if self.kind == "decode_attention":
            return 4.0 * self.n * self.heads * self.k
        return 2.0 * self.m * self.n * self.k * self.weights


def _attention_projections(cfg: Showo2Config, m: int) -> list[Product]:
    """q/k/v (one merged product) and o of one trunk layer, ``m`` rows."""
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return [Product("q/k/v", "norm", m, q + 2 * kv, h, q + 2 * kv, h), Product("o", "plain", m, h, q, h, q)]


def _ffn(cfg: Showo2Config, m: int, width: int, suffix: str = "") -> list[Product]:
    """gate/up and down of one trunk layer at FFN ``width``: views of the full weights, ``m`` rows."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    return [Product(f"gate/up{suffix}", "gate_up", m, width, h, inter, h, weights=2),
            Product(f"down{suffix}", "down", m, h, width, h, inter)]


def decode_products(cfg: Showo2Config, config: FlashUConfig, cache_len: int = DEFAULT_CACHE_LEN) -> list[Product]:
    """The products of one FlashU decode layer (at the kept FFN width; its attention over ``cache_len`` cache slots)
    and the lm_head, one row each."""
    h = cfg.hidden_size
    attention = Product("attention", "decode_attention", 1, cache_len, cfg.head_dim, 0, 0, heads=cfg.num_heads,
                        kv_heads=cfg.num_kv_heads)
    return [*_attention_projections(cfg, 1), attention, *_ffn(cfg, 1, config.kept_ffn_width(cfg.intermediate_size)),
            Product("lm_head", "norm", 1, cfg.vocab_size, h, cfg.vocab_size, h)]


def gen_products(cfg: Showo2Config, config: FlashUConfig, prefix: int) -> list[Product]:
    """The products of one trunk layer over a CFG call's image block: (2 x image slot) rows; the FFN at full and
    kept width; attention of the block over ``prefix`` + block keys."""
    s = cfg.image_slot_len
    attention = Product("attention", "attention", s, prefix + s, cfg.head_dim, 0, 0, heads=cfg.num_heads,
                        kv_heads=cfg.num_kv_heads)
    return [*_attention_projections(cfg, 2 * s), attention, *_ffn(cfg, 2 * s, cfg.intermediate_size),
            *_ffn(cfg, 2 * s, config.kept_ffn_width(cfg.intermediate_size), " kept")]


def token_layers(cfg: Showo2Config, config: FlashUConfig) -> int:
    """Layers a decode token runs on a skip step (the common step: all but every skip_interval-th)."""
    return cfg.num_layers - config.num_skipped_layers(cfg.num_layers)


def fused_fn(kind: str, eps: float) -> Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]:
    """The product with what the decode part fuses into it (the ``inductor`` variant, before compiling)."""
    if kind == "norm":
        return lambda x, nw, w: F.linear(rms_norm(x, nw, eps), w)
    if kind == "gate_up":
        def gate_up(x: torch.Tensor, nw: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor):
            xn = rms_norm(x, nw, eps)
            return F.linear(xn, wg), F.linear(xn, wu)
        return gate_up
    if kind == "down":
        return lambda g, u, res, w: res + (F.silu(g) * u) @ w.T
    if kind == "plain":
        return lambda x, w: x @ w.T
    if kind == "attention":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    if kind == "decode_attention":
        return lambda q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


@dataclass
class Case:
    """A product's inputs: activations shared by every call, ``copies`` weight sets (each call reads its own)."""

    product: Product
    acts: dict[str, torch.Tensor]
    weights: list[list[torch.Tensor]]  # per copy: the weight views the product reads (attention: none)

    def args(self, copy: int) -> tuple[torch.Tensor, ...]:
        a, kind = self.acts, self.product.kind
        if kind == "attention":
            return a["q"], a["k"], a["v"]
        w = self.weights[copy]
        if kind == "decode_attention":
            return a["q"], w[0], w[1], a["mask"]
        if kind == "norm":
            return a["x"], a["norm"], w[0]
        if kind == "gate_up":
            return a["x"], a["norm"], w[0], w[1]
        if kind == "down":
            return a["g"], a["u"], a["res"], w[0]
        return a["x"], w[0]


def make_case(p: Product, device: torch.device, dtype: torch.dtype, copies: int, seed: int = 0) -> Case:
    """Random activations and ``copies`` weight sets, each weight a view of a full-size tensor as the executors
    slice them (FFN rows of gate/up, columns of down, from neuron 0). Attention: keys and values repeated to the
    query heads, as the model's attention reads them."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    if p.kind == "decode_attention":
        mask = torch.zeros(1, 1, 1, p.n, device=device, dtype=dtype)
        mask[..., p.n - min(UNWRITTEN_SLOTS, p.n - 1):] = float("-inf")
        caches = [[rand(1, p.kv_heads, p.n, p.k) for _ in range(2)] for _ in range(copies)]
        return Case(p, {"q": rand(1, p.heads, 1, p.k), "mask": mask}, caches)
    if p.kind == "attention":
        rep = p.heads // p.kv_heads
        grouped = [rand(2, p.kv_heads, p.n, p.k) for _ in range(2)]
        kv = [t.repeat_interleave(rep, dim=1) for t in grouped]
        # as the trunk attends: the cond row sees every key, the null row's prefix is padded after its prompt
        mask = torch.ones(2, 1, p.m, p.n, dtype=torch.bool, device=device)
        mask[1, ..., min(NULL_PROMPT, p.n - p.m): p.n - p.m] = False
        acts = {"q": rand(2, p.heads, p.m, p.k), "k": kv[0], "v": kv[1], "kg": grouped[0], "vg": grouped[1],
                "mask": mask}
        return Case(p, acts, [[] for _ in range(copies)])
    if p.kind == "down":
        acts = {"g": rand(p.m, p.k), "u": rand(p.m, p.k), "res": rand(p.m, p.n)}
    else:
        acts = {"x": rand(p.m, p.k), "norm": rand(p.k, scale=0.1) + 1}
    scale = 1 / math.sqrt(p.k)
    weights = []
    for _ in range(copies):
        full = [rand(p.n_full, p.k_full, scale=scale) for _ in range(p.weights)]
        weights.append([f[: p.n] if p.kind == "gate_up" else f[:, : p.k] if p.kind == "down" else f for f in full])
    return Case(p, acts, weights)


def variant_calls(case: Case, variant: str, eps: float, backend: str) -> list[Callable[[], object]] | None:
    """One call per weight copy of ``variant`` (None where it does not apply to the product)."""
    kind, n = case.product.kind, len(case.weights)
    if variant in SDPA_VARIANTS:
        return [functools.partial(sdpa_as_called, case, variant)] * n if kind == "attention" else None
    if variant == "flex":
        return [flex_call(case, backend)] * n if kind == "attention" else None
    if variant in ("bias", "per-row", "key-mask", "key-bias"):
        return [padding_calls(case, variant)] * n if kind == "attention" else None
    if variant == "library":
        if kind == "attention":
            return [lambda: F.scaled_dot_product_attention(*case.args(0)) for _ in range(n)]
        if kind == "decode_attention":
            fn = fused_fn(kind, eps)
            return [lambda i=i: fn(*case.args(i)) for i in range(n)]
        if kind == "down":
            h = F.silu(case.acts["g"]) * case.acts["u"]
            return [lambda i=i: h @ case.weights[i][0].T for i in range(n)]
        x = case.acts["x"] if kind == "plain" else rms_norm(case.acts["x"], case.acts["norm"], eps)
        return [lambda i=i: [x @ w.T for w in case.weights[i]] for i in range(n)]
    if kind == "attention":
        return None
    # As the backend compiles its one-row parts: coordinate-descent tuning, no inductor CUDA graphs.
    options = {"coordinate_descent_tuning": True, "triton.cudagraphs": False} if backend == "inductor" else None

    def compile_(fn: Callable) -> Callable:
        return torch.compile(fn, backend=backend, options=options, dynamic=False)

    if variant == "inductor":
        fn = compile_(functools.partial(decode_attention, enable_gqa=True) if kind == "decode_attention"
                      else fused_fn(kind, eps))
        return [lambda i=i: fn(*case.args(i)) for i in range(n)]
    if variant == "inductor-folded" and kind in ("norm", "gate_up"):
        # the backend's own last stage for a one-row part, passes.norm_in_products included
        settings = PartSettings(backend="inductor" if backend == "inductor" else "eager", merge=False,
                                eager_numerics=False, coordinate_descent=True, norm_in_products=True)
        folding = functools.partial(compile_graph, settings=settings, name="products")
        fn = torch.compile(fused_fn(kind, eps), backend=folding, dynamic=False)
        return [lambda i=i: fn(*case.args(i)) for i in range(n)]
    if variant == "inductor-split" and kind == "down":
        act = compile_(lambda g, u: F.silu(g) * u)
        prod = compile_(lambda h, res, w: res + h @ w.T)
        a = case.acts
        return [lambda i=i: prod(act(a["g"], a["u"]), a["res"], case.weights[i][0]) for i in range(n)]
    return None


def sdpa_as_called(case: Case, variant: str) -> torch.Tensor:
    """The gen attention as the trunk calls it (grouped K/V heads; the bool mask where the variant reads it), with
    the SDPA backend the variant forces (``SDPA_VARIANTS``). A backend that cannot run the call raises."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend, masked = SDPA_VARIANTS[variant]
    a = case.acts
    with nullcontext() if backend is None else sdpa_kernel(getattr(SDPBackend, backend)):
        return F.scaled_dot_product_attention(a["q"], a["kg"], a["vg"], attn_mask=a["mask"] if masked else None,
                                              enable_gqa=True)


def flex_call(case: Case, backend: str) -> Callable[[], torch.Tensor]:
    """The masked gen attention through FlexAttention, compiled by ``backend``: the mask as a key-padding
    ``mask_mod`` (every query of a row sees the same keys), so whole blocks of hidden keys are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    a, p = case.acts, case.product
    visible = a["mask"][:, 0, 0].contiguous()  # (2, keys)

    def key_padding(b, h, q_idx, kv_idx):
        return visible[b, kv_idx]

    block_mask = create_block_mask(key_padding, B=2, H=None, Q_LEN=p.m, KV_LEN=p.n, device=a["q"].device)
    attend = torch.compile(flex_attention, backend=backend, dynamic=False)
    return lambda: attend(a["q"], a["kg"], a["vg"], block_mask=block_mask, enable_gqa=True)


def padding_calls(case: Case, variant: str) -> Callable[[], torch.Tensor]:
    """Ways to hide the null row's padded keys other than the trunk's (M, 1, S, keys) bool mask: ``bias``, that
    mask as an additive bias made once (what one conversion per call, shared by every layer, leaves); ``key-mask``
    and ``key-bias``, its one query row (M, 1, 1, keys), as bool and as a bias, broadcast over the queries (every slot
    query of a row sees the same keys); ``per-row``,
    one unmasked call per row over only the keys it sees, laid out contiguously beforehand (a layout that puts each
    row's visible keys first would need no copy)."""
    a = case.acts
    if variant in ("bias", "key-mask", "key-bias"):
        mask = a["mask"] if variant == "bias" else a["mask"][:, :, :1]  # key-*: one row, broadcast over the queries
        bias = mask if variant == "key-mask" else \
            torch.zeros(mask.shape, dtype=a["q"].dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        return lambda: F.scaled_dot_product_attention(a["q"], a["kg"], a["vg"], attn_mask=bias, enable_gqa=True)
    visible = a["mask"][:, 0, 0]
    rows = [(a["q"][r: r + 1], a["kg"][r: r + 1, :, visible[r]].contiguous(),
             a["vg"][r: r + 1, :, visible[r]].contiguous()) for r in range(2)]

    def per_row() -> torch.Tensor:
        return torch.cat([F.scaled_dot_product_attention(q, k, v, enable_gqa=True) for q, k, v in rows])

    return per_row


def reference(case: Case, eps: float) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The fused function in eager fp32 on the first weight copy."""
    args = tuple(t.float() for t in case.args(0))
    return fused_fn(case.product.kind, eps)(*args)


def masked_reference(case: Case) -> torch.Tensor:
    """The gen attention with the trunk's mask, in eager fp32 (the masked variants' reference)."""
    a = {k: v.float() if v.is_floating_point() else v for k, v in case.acts.items()}
    return F.scaled_dot_product_attention(a["q"], a["k"], a["v"], attn_mask=a["mask"])


def _as_tuple(out: object) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def check_variant(case: Case, calls: list[Callable[[], object]], variant: str, eps: float) -> float:
    """Largest error of the variant's first call against the fp32 reference, relative to the reference's scale."""
    want = _as_tuple(masked_reference(case) if variant in MASKED else reference(case, eps))
    got = _as_tuple(calls[0]())
    if variant == "library" and case.product.kind == "down":  # the bare product: add the residual to compare
        got = (got[0] + case.acts["res"],)
    return max(float((g.float() - w).abs().max() / w.abs().max().clamp_min(1e-6))
               for g, w in zip(got, want, strict=True))


def time_us(calls: list[Callable[[], object]], device: torch.device, repeats: int) -> float:
    """Device time per call under one CUDA graph (GPU), else the median wall time of a pass over the copies."""
    if device.type == "cuda":
        return graph_us(calls, replays=repeats)
    for call in calls:
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for call in calls:
            call()
        times.append((time.perf_counter() - start) / len(calls) * 1e6)
    return statistics.median(times)


def measure(products: list[Product], variants: tuple[str, ...], device: torch.device, dtype: torch.dtype,
            repeats: int, backend: str, eps: float) -> list[dict]:
    """One row per (product, variant that applies): time, bytes, FLOPs and the error against fp32."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = []
    for p in products:
        nbytes = p.weight_bytes(itemsize)
        copies = max(1, math.ceil(ROTATE_BYTES / nbytes)) if device.type == "cuda" and nbytes else 1
        case = make_case(p, device, dtype, copies)
        for variant in variants:
            calls = variant_calls(case, variant, eps, backend)
            if calls is None:
                continue
            try:
                err = check_variant(case, calls, variant, eps)  # also the first call: compiles before the timing
            except RuntimeError as error:  # a forced SDPA backend that does not take this call on this device
                if variant not in SDPA_VARIANTS:
                    raise
                print(f"{p.name} {variant}: not run ({str(error).splitlines()[0][:100]})")
                continue
            rows.append({"product": p.name, "variant": variant, "m": p.m, "n": p.n, "k": p.k, "weight_bytes": nbytes,
                         "flops": p.flops(), "max_rel_err": err, "us": time_us(calls, device, repeats)})
        del case
    return rows


def und_summary(rows: list[dict], products: list[Product], layers: int, copy_gbps: float | None,
                itemsize: int) -> dict:
    """Per variant, one layer's and one token's time (a variant that does not apply to a product counts that
    product's inductor time), and the token's weight bytes at the copy bandwidth."""
    times = {(r["product"], r["variant"]): r["us"] for r in rows}

    def us(product: str, variant: str) -> float:
        return times.get((product, variant), times[product, "inductor"])

    totals = {}
    for v in VARIANTS["und"]:
        layer = sum(us(p.name, v) for p in products if p.name != "lm_head")
        totals[v] = {"layer_us": layer, "token_us": layers * layer + us("lm_head", v)}
    token_bytes = sum(p.weight_bytes(itemsize) * (1 if p.name == "lm_head" else layers) for p in products)
    return {"layers_per_token": layers, "totals": totals, "token_weight_bytes": token_bytes,
            "token_floor_us": token_bytes / copy_gbps / 1e3 if copy_gbps else None}


def gen_summary(rows: list[dict], tflops: float | None) -> dict:
    """A full and a pruned trunk layer at the library's speed (the ``library`` rows), against the same FLOPs at the
    peak rate."""
    times = {r["product"]: r for r in rows if r.get("variant", "library") == "library"}
    out = {}
    for width, ffn in (("full", ("gate/up", "down")), ("kept", ("gate/up kept", "down kept"))):
        names = ("q/k/v", "o", "attention", *ffn)
        us, flops = sum(times[n]["us"] for n in names), sum(times[n]["flops"] for n in names)
        floor = flops / tflops / 1e6 if tflops else None
        out[width] = {"layer_us": us, "layer_flops": flops, "layer_floor_us": floor,
                      "share_of_peak": floor / us if floor else None}
    return out


def sustained_rate(calls: list[Callable[[], object]], flops_per_call: float, seconds: float,
                   window_ms: float = 50.0) -> dict:
    """The rate of ``calls`` (one CUDA graph) replayed back to back for ``seconds``: TFLOP/s over the first
    ``window_ms`` and over the last half, as a short benchmark and a whole image (0.3-0.8 s of such products) see
    the device, and the SM clock and power meanwhile (``harness.clocks``; None without NVML). A device that lowers
    its clocks under sustained load shows it here."""
    graph = capture_graph(calls)
    torch.cuda.synchronize()
    marks = [torch.cuda.Event(enable_timing=True)]
    marks[0].record()
    start = time.perf_counter()
    with ClockSampler(nvml_reader(torch.device("cuda"))) as clocks:
        while time.perf_counter() - start < seconds:  # the host queues replays far ahead of the device
            for _ in range(16):
                graph.replay()
                marks.append(torch.cuda.Event(enable_timing=True))
                marks[-1].record()
        torch.cuda.synchronize()
    ends = [marks[0].elapsed_time(m) for m in marks[1:]]  # ms from the first replay's start
    per_replay = flops_per_call * len(calls)

    def rate(lo_ms: float, hi_ms: float) -> float:
        inside = [i for i, t in enumerate(ends) if lo_ms < t <= hi_ms]
        span = ends[inside[-1]] - (ends[inside[0] - 1] if inside[0] else 0.0)
        return per_replay * len(inside) / span / 1e9

    total = ends[-1]
    return {"seconds": total / 1e3, "replays": len(ends), "first_window_ms": window_ms,
            "first_TFLOPs": rate(0.0, window_ms), "last_half_TFLOPs": rate(total / 2, total),
            "clocks": clocks.summary()}


def run(task: str, cfg: Showo2Config, config: FlashUConfig, device: torch.device, dtype: torch.dtype,
        repeats: int, backend: str, copy_gbps: float | None, tflops: float | None, prefix: int,
        cache_len: int = DEFAULT_CACHE_LEN, sustained_seconds: float = 0.0) -> dict:
    itemsize = torch.empty((), dtype=dtype).element_size()
    products = decode_products(cfg, config, cache_len) if task == "und" else gen_products(cfg, config, prefix)
    rows = measure(products, VARIANTS[task], device, dtype, repeats, backend, cfg.rms_norm_eps)
    for r in rows:
        r["GBps"] = r["weight_bytes"] / r["us"] / 1e3
        r["pct_copy_bw"] = 100 * r["GBps"] / copy_gbps if copy_gbps else None
        r["TFLOPs"] = r["flops"] / r["us"] / 1e6
        r["pct_peak"] = 100 * r["TFLOPs"] / tflops if tflops else None
    result = {"task": task, "preset": cfg.name, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
              "kept_ffn_width": config.kept_ffn_width(cfg.intermediate_size), "copy_GBps": copy_gbps,
              "peak_TFLOPs": tflops, "rows": rows}
    if task == "und":
        result |= und_summary(rows, products, token_layers(cfg, config), copy_gbps, itemsize)
    else:
        result |= {"prefix": prefix, "rows_per_product": 2 * cfg.image_slot_len, "layer": gen_summary(rows, tflops)}
        if sustained_seconds > 0 and device.type == "cuda":
            gate_up = next(p for p in products if p.name == "gate/up")
            case = make_case(gate_up, device, dtype, max(1, math.ceil(ROTATE_BYTES / gate_up.weight_bytes(itemsize))))
            calls = variant_calls(case, "library", cfg.rms_norm_eps, backend)
            result["sustained"] = {"product": gate_up.name, **sustained_rate(calls, gate_up.flops(),
                                                                             sustained_seconds)}
    return result


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}%"


def report(result: dict) -> str:
    if result["task"] == "und":
        head = ["product", "variant", "n x k", "MB", "us", "GB/s", "of copy", "rel err"]
        rows = [[r["product"], r["variant"], f"{r['n']} x {r['k']}", f"{r['weight_bytes'] / 1e6:.1f}",
                 f"{r['us']:.1f}", f"{r['GBps']:.0f}", _pct(r["pct_copy_bw"]), f"{r['max_rel_err']:.1e}"]
                for r in result["rows"]]
        lines = [format_table(head, rows)]
        floor = result["token_floor_us"]
        for v, t in result["totals"].items():
            share = f", {100 * floor / t['token_us']:.0f}% of the copy floor ({floor:.0f} us)" if floor else ""
            lines.append(f"{v}: {t['layer_us']:.1f} us per layer, {t['token_us']:.0f} us per token "
                         f"({result['layers_per_token']} layers + lm_head){share}")
        return "\n".join(lines)
    head = ["product", "variant", "m x n x k", "GFLOP", "us", "TFLOP/s", "of peak", "rel err"]
    rows = [[r["product"], r["variant"], f"{r['m']} x {r['n']} x {r['k']}", f"{r['flops'] / 1e9:.2f}", f"{r['us']:.1f}",
             f"{r['TFLOPs']:.0f}", _pct(r["pct_peak"]), f"{r['max_rel_err']:.1e}"] for r in result["rows"]]
    lines = [format_table(head, rows)]
    for width, s in result["layer"].items():
        share = f", {100 * s['share_of_peak']:.0f}% of the peak rate" if s["share_of_peak"] else ""
        lines.append(f"one trunk layer, FFN {width}: {s['layer_us']:.0f} us at the library's speed{share}")
    attention = {r["variant"]: r["us"] for r in result["rows"] if r["product"] == "attention"}
    if "masked" in attention:
        best = min(attention, key=attention.get)
        lines.append(f"attention as the trunk calls it (masked, grouped heads): {attention['masked']:.1f} us; fastest "
                     f"variant {best}: {attention[best]:.1f} us")
    if "sustained" in result:
        s = result["sustained"]
        held = s.get("clocks")
        clock = "" if not held else (f"; SM clock median {held['median_mhz']:.0f} MHz (lowest {held['min_mhz']:.0f}), "
                                     f"{held['median_w']:.0f} W")
        lines.append(f"{s['product']} replayed for {s['seconds']:.1f} s: {s['first_TFLOPs']:.0f} TFLOP/s over the "
                     f"first {s['first_window_ms']:.0f} ms, {s['last_half_TFLOPs']:.0f} over the last half{clock}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = command_parser("python -m harness.products", __doc__)
    p.add_argument("--task", default="und", choices=tuple(VARIANTS), help="a decode token or a generation call")
    p.add_argument("--preset", default="showo2-7b", choices=list(PRESETS), help="model shapes")
    p.add_argument("--device", default="cuda", help="cuda (timings) or cpu (a check of the variants)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="weights and activations")
    p.add_argument("--repeats", type=int, default=15, help="timed replays (GPU) or passes (CPU)")
    p.add_argument("--prefix-len", type=int, default=64, help="gen: text prefix (bos, prompt, boi) the block sees")
    p.add_argument("--cache-len", type=int, default=DEFAULT_CACHE_LEN,
                   help="und: KV cache slots a decode step attends over (its capacity)")
    p.add_argument("--backend", default="inductor",
                   help="torch.compile backend of the compiled variants (und; gen: flex)")
    p.add_argument("--sustained-seconds", type=float, default=0.0,
                   help="gen on a GPU: also replay the full gate/up product this long and report its rate at the "
                        "start and over the last half (clocks under sustained load)")
    p.add_argument("--max-rel-err", type=float, default=2e-2, help="fail when a variant is further off than this")
    p.add_argument("--out", default="products.json", help="JSON output path")
    args = p.parse_args(argv)
    for name in ("repeats", "prefix_len", "cache_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid: allowed an integer >= 1")
    if not 0 <= args.sustained_seconds <= 60:
        p.error(f"--sustained-seconds={args.sustained_seconds} is invalid: allowed 0 (off) to 60")
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    copy = tflops = None
    if device.type == "cuda":
        copy, tflops = measure_copy_gbps(), peak_tflops(torch.cuda.get_device_name())
        print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy:.0f} GB/s (read + write); bf16 matmul peak "
              f"{'not measured' if tflops is None else f'{tflops:.0f} TFLOP/s'}")
    cfg = get_config(args.preset)
    result = run(args.task, cfg, FlashUConfig.for_task(args.task), device, dtype, args.repeats, args.backend, copy,
                 tflops, args.prefix_len, args.cache_len, args.sustained_seconds)
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    print(report(result))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    bad = [r for r in result["rows"] if r["max_rel_err"] > args.max_rel_err]
    for r in bad:
        print(f"{r['product']} {r['variant']}: relative error {r['max_rel_err']:.2e} above --max-rel-err")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
