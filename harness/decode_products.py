"""``python -m harness.decode_products``: each product of one understanding decode token, timed alone.

    python -m harness.decode_products --preset showo2-7b                       # on a GPU
    python -m harness.decode_products --preset tiny --device cpu --repeats 3   # a check of the variants (CPU)

``harness.profile_und`` says what each fused kernel of a decode token takes; this says what each product could
take. For every product a FlashU decode layer runs at one row (q/k/v merged, o, gate/up and down at the kept FFN
width, as views of the full weights like the executors' slices) and for the lm_head, it times:

- ``library``: the bare product ``x @ W.T`` in eager torch (cuBLAS's GEMV on a GPU);
- ``inductor``: the product with what the decode part fuses into it (the RMSNorm before q/k/v, gate/up and the
  lm_head; silu(gate) * up before down and the residual add after it), compiled by inductor with coordinate-descent
  tuning, as the backend compiles its one-row parts (``tune_decode=True``);
- ``inductor-split`` (down only): silu(gate) * up compiled on its own, then the product and the add: whether the
  down product loses bandwidth by re-reading both FFN activations in every one of its programs.

On a GPU each time is device time per call: the median over replays of one CUDA graph that calls the product on
enough weight copies to read HBM rather than L2 (``harness.kernels.graph_us``). Each row gives microseconds, the
weight bytes read, GB/s and the share of the copy bandwidth. The summary adds one token's layers (the FlashU skip
step's depth) and the lm_head into a per-token time for each variant, against that token's weight bytes at the copy
bandwidth. On the CPU the command checks every variant against the eager product and reports wall times.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flashu_fx.config import PRESETS, Showo2Config, get_config
from flashu_fx.flashu_config import FlashUConfig
from harness.arguments import command_parser
from harness.devices import resolve_device
from harness.tables import format_table

ROTATE_BYTES = 256 * 2**20  # weight copies per graph: several times any L2 (H100 50 MB, H200 60 MB)
VARIANTS = ("library", "inductor", "inductor-split")


@dataclass(frozen=True)
class Product:
    """One one-row product of a decode token: ``out = x @ W.T`` with W ``(n, k)``, a view of ``(n_full, k_full)``.

    ``kind`` says what the decode part fuses with it: "norm" (RMSNorm before: q/k/v, lm_head), "gate_up" (RMSNorm
    before, two weights: gate and up), "down" (silu(gate) * up before, the residual add after), "plain" (o)."""

    name: str
    kind: str
    n: int
    k: int
    n_full: int
    k_full: int
    weights: int = 1  # gate_up: 2

    def weight_bytes(self, itemsize: int) -> int:
        return self.weights * self.n * self.k * itemsize


def decode_products(cfg: Showo2Config, config: FlashUConfig) -> list[Product]:
    """The products of one FlashU decode layer (at the kept FFN width) and the lm_head."""
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    inter, kept = cfg.intermediate_size, config.kept_ffn_width(cfg.intermediate_size)
    return [
        Product("q/k/v", "norm", q + 2 * kv, h, q + 2 * kv, h),
        Product("o", "plain", h, q, h, q),
        Product("gate/up", "gate_up", kept, h, inter, h, weights=2),
        Product("down", "down", h, kept, h, inter),
        Product("lm_head", "norm", cfg.vocab_size, h, cfg.vocab_size, h),
    ]


def token_layers(cfg: Showo2Config, config: FlashUConfig) -> int:
    """Layers a decode token runs on a skip step (the common step: all but every skip_interval-th)."""
    return cfg.num_layers - config.num_skipped_layers(cfg.num_layers)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def fused_fn(kind: str, eps: float) -> Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]:
    """The product with what the decode part fuses into it (the ``inductor`` variant, before compiling)."""
    if kind == "norm":
        return lambda x, nw, w: _rms(x, nw, eps) @ w.T
    if kind == "gate_up":
        def gate_up(x: torch.Tensor, nw: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor):
            xn = _rms(x, nw, eps)
            return xn @ wg.T, xn @ wu.T
        return gate_up
    if kind == "down":
        return lambda g, u, res, w: res + (F.silu(g) * u) @ w.T
    if kind == "plain":
        return lambda x, w: x @ w.T
    raise ValueError(f"kind must be one of 'norm', 'gate_up', 'down', 'plain', got {kind!r}")


@dataclass
class Case:
    """A product's inputs: activations shared by every call, ``copies`` weight sets (each call reads its own)."""

    product: Product
    acts: dict[str, torch.Tensor]
    weights: list[list[torch.Tensor]]  # per copy: the weight views the product reads

    def args(self, copy: int) -> tuple[torch.Tensor, ...]:
        a, w = self.acts, self.weights[copy]
        kind = self.product.kind
        if kind == "norm":
            return a["x"], a["norm"], w[0]
        if kind == "gate_up":
            return a["x"], a["norm"], w[0], w[1]
        if kind == "down":
            return a["g"], a["u"], a["res"], w[0]
        return a["x"], w[0]


def make_case(p: Product, device: torch.device, dtype: torch.dtype, copies: int, seed: int = 0) -> Case:
    """Random activations and ``copies`` weight sets, each weight a view of a full-size tensor as the executors
    slice them (FFN rows of gate/up, columns of down, from neuron 0)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    if p.kind == "down":
        acts = {"g": rand(1, p.k), "u": rand(1, p.k), "res": rand(1, p.n)}
    else:
        acts = {"x": rand(1, p.k), "norm": rand(p.k, scale=0.1) + 1}
    scale = 1 / math.sqrt(p.k)
    weights = []
    for _ in range(copies):
        full = [rand(p.n_full, p.k_full, scale=scale) for _ in range(p.weights)]
        weights.append([f[: p.n] if p.kind == "gate_up" else f[:, : p.k] if p.kind == "down" else f for f in full])
    return Case(p, acts, weights)


def variant_calls(case: Case, variant: str, eps: float, backend: str) -> list[Callable[[], object]] | None:
    """One call per weight copy of ``variant`` (None where it does not apply to the product)."""
    kind = case.product.kind
    n = len(case.weights)
    if variant == "library":
        if kind == "down":
            h = F.silu(case.acts["g"]) * case.acts["u"]
            return [lambda i=i: h @ case.weights[i][0].T for i in range(n)]
        x = case.args(0)[0] if kind == "plain" else _rms(case.acts["x"], case.acts["norm"], eps)
        return [lambda i=i: [x @ w.T for w in case.weights[i]] for i in range(n)]
    # As the backend compiles its one-row parts: coordinate-descent tuning, no inductor CUDA graphs.
    options = {"coordinate_descent_tuning": True, "triton.cudagraphs": False} if backend == "inductor" else None

    def compile_(fn: Callable) -> Callable:
        return torch.compile(fn, backend=backend, options=options, dynamic=False)

    if variant == "inductor":
        fn = compile_(fused_fn(kind, eps))
        return [lambda i=i: fn(*case.args(i)) for i in range(n)]
    if variant == "inductor-split" and kind == "down":
        act = compile_(lambda g, u: F.silu(g) * u)
        prod = compile_(lambda h, res, w: res + h @ w.T)
        a = case.acts
        return [lambda i=i: prod(act(a["g"], a["u"]), a["res"], case.weights[i][0]) for i in range(n)]
    return None


def reference(case: Case, eps: float) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The fused function in eager fp32 on the first weight copy."""
    args = tuple(t.float() for t in case.args(0))
    return fused_fn(case.product.kind, eps)(*args)


def _as_tuple(out: object) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def check_variant(case: Case, calls: list[Callable[[], object]], variant: str, eps: float) -> float:
    """Largest error of the variant's first call against the fp32 reference, relative to the reference's scale."""
    want = _as_tuple(reference(case, eps))
    got = _as_tuple(calls[0]())
    if variant == "library" and case.product.kind == "down":  # the bare product: add the residual to compare
        got = (got[0] + case.acts["res"],)
    return max(float((g.float() - w).abs().max() / w.abs().max().clamp_min(1e-6))
               for g, w in zip(got, want, strict=True))


def time_us(calls: list[Callable[[], object]], device: torch.device, repeats: int) -> float:
    """Device time per call under one CUDA graph (GPU), else the median wall time of a pass over the copies."""
    if device.type == "cuda":
        from harness.kernels import graph_us

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


def run(cfg: Showo2Config, config: FlashUConfig, device: torch.device, dtype: torch.dtype, repeats: int,
        backend: str, copy_gbps: float | None) -> dict:
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = []
    for p in decode_products(cfg, config):
        nbytes = p.weight_bytes(itemsize)
        copies = max(1, math.ceil(ROTATE_BYTES / nbytes)) if device.type == "cuda" else 1
        case = make_case(p, device, dtype, copies)
        for variant in VARIANTS:
            calls = variant_calls(case, variant, cfg.rms_norm_eps, backend)
            if calls is None:
                continue
            err = check_variant(case, calls, variant, cfg.rms_norm_eps)
            us = time_us(calls, device, repeats)
            gbps = nbytes / us / 1e3
            rows.append({"product": p.name, "variant": variant, "n": p.n, "k": p.k, "weight_bytes": nbytes,
                         "us": us, "GBps": gbps, "pct_copy_bw": 100 * gbps / copy_gbps if copy_gbps else None,
                         "max_rel_err": err})
        del case
    layers = token_layers(cfg, config)
    products = decode_products(cfg, config)
    times = {(r["product"], r["variant"]): r["us"] for r in rows}
    totals = {}
    for v in VARIANTS:  # a variant that does not apply to a product counts that product's inductor time
        def us(product: str, v: str = v) -> float:
            return times.get((product, v), times[product, "inductor"])
        layer = sum(us(p.name) for p in products if p.name != "lm_head")
        totals[v] = {"layer_us": layer, "token_us": layers * layer + us("lm_head")}
    token_bytes = sum(p.weight_bytes(itemsize) * (1 if p.name == "lm_head" else layers) for p in products)
    floor_us = token_bytes / copy_gbps / 1e3 if copy_gbps else None
    return {"preset": cfg.name, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "layers_per_token": layers, "kept_ffn_width": config.kept_ffn_width(cfg.intermediate_size),
            "copy_GBps": copy_gbps, "rows": rows, "totals": totals,
            "token_weight_bytes": token_bytes, "token_floor_us": floor_us}


def report(result: dict) -> str:
    rows = [[r["product"], r["variant"], f"{r['n']} x {r['k']}", f"{r['weight_bytes'] / 1e6:.1f}", f"{r['us']:.1f}",
             f"{r['GBps']:.0f}", "" if r["pct_copy_bw"] is None else f"{r['pct_copy_bw']:.0f}%",
             f"{r['max_rel_err']:.1e}"] for r in result["rows"]]
    lines = [format_table(["product", "variant", "n x k", "MB", "us", "GB/s", "of copy", "rel err"], rows)]
    floor = result["token_floor_us"]
    for v, t in result["totals"].items():
        share = f", {100 * floor / t['token_us']:.0f}% of the copy floor ({floor:.0f} us)" if floor else ""
        lines.append(f"{v}: {t['layer_us']:.1f} us per layer, {t['token_us']:.0f} us per token "
                     f"({result['layers_per_token']} layers + lm_head){share}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = command_parser("python -m harness.decode_products", __doc__)
    p.add_argument("--preset", default="showo2-7b", choices=list(PRESETS), help="model shapes")
    p.add_argument("--device", default="cuda", help="cuda (timings) or cpu (a check of the variants)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="weights and activations")
    p.add_argument("--repeats", type=int, default=15, help="timed replays (GPU) or passes (CPU)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled variants")
    p.add_argument("--max-rel-err", type=float, default=2e-2, help="fail when a variant is further off than this")
    p.add_argument("--out", default="decode_products.json", help="JSON output path")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats={args.repeats} is invalid: allowed an integer >= 1")
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    copy = None
    if device.type == "cuda":
        from harness.kernels import copy_gbps

        copy = copy_gbps()
        print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy:.0f} GB/s (read + write)")
    cfg = get_config(args.preset)
    result = run(cfg, FlashUConfig.for_task("und"), device, dtype, args.repeats, args.backend, copy)
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
