"""``python -m harness floors``: the physical floor of each benchmarked path, from the model's shapes alone.

    python -m harness floors --preset showo2-7b
    python -m harness floors --preset showo2-1.5b --eager-gen 2.2 --eager-nokv 0.74 --eager-kv 0.65

Counts what a path cannot avoid: the FLOPs of its matmuls and attention (generation, prefill) or the bytes of
weights and KV cache one decode token must read, and divides by the device's measured rates (bf16 matmul
784 TFLOP/s, copy 4245 GB/s on an H200: docs/REFERENCE_MEASUREMENTS.md, docs/KERNELS.md; ``--tflops``, ``--bandwidth``).
Norms, elementwise kernels and launch gaps come on top, so ``eager seconds / floor`` is the largest speedup
any implementation of that path can show against that eager time. Eager times default to the anchors
(upstream's, H200); pass your own bench's to get ratios against it.

What each path computes (per image / per request):
- gen upstream: all L positions of both CFG rows in each call, SigLIP on both, lm_head (docs/REFERENCE_MEASUREMENTS.md);
- gen exact: the image block of each row (prefix K/V once per image, not counted), SigLIP once, no lm_head;
- gen FlashU: the schedule of ``gen_schedule`` (shorter grid; pruned FFN width, skipped layers, and on a
  head-cache hit without a measurement only the FinalLayer);
- und: image features, prefill (FlashU: pruned FFN, image tokens cut after the pruning layer), first logits,
  then per decode token the weights of every layer it runs (FlashU: skipped layers on non-measuring steps,
  pruned FFN), the lm_head and the valid KV cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from flashu_fx.compiled import compiled_batch
from flashu_fx.config import PRESETS, Showo2Config, get_config
from flashu_fx.flashu_config import FlashUConfig
from flashu_fx.layout import build_gen_batch
from flashu_fx.schedule import gen_schedule
from harness.arguments import command_parser
from harness.tables import format_table

# Measured dense bf16 matmul rates (8192^3 products, random data): H200 784 TFLOP/s (docs/REFERENCE_MEASUREMENTS.md),
# H100 80GB HBM3 798 TFLOP/s (measured the same way on an H100).
MEASURED_BF16_TFLOPS = {"H200": 784.0, "H100": 798.0}
H200_COPY_GBPS = 4245.0  # eager 1 GiB device-to-device copy, bytes read + written (docs/KERNELS.md)
H200 = "NVIDIA H200"  # the device the default rates were measured on (torch.cuda.get_device_name)
# Anchors (docs/REFERENCE_MEASUREMENTS.md, H200): upstream eager gen s/image; und no-cache and KV-cache eager s/request.
ANCHOR_SECONDS = {
    "showo2-1.5b": {"gen": 2.98, "nokv": 0.74, "kv": 0.65},
    "showo2-7b": {"gen": 4.50, "nokv": 0.89, "kv": 0.69},
}


@dataclass(frozen=True)
class Rates:
    tflops: float  # dense bf16 matmul rate, 1e12 FLOP/s
    gbps: float  # copy bandwidth, 1e9 B/s
    source: str = field(default="given", compare=False)  # where they come from, e.g. "measured on an NVIDIA H200"

    def compute_s(self, flops: float) -> float:
        return flops / (self.tflops * 1e12)

    def read_s(self, nbytes: float) -> float:
        return nbytes / (self.gbps * 1e9)


# ---- generation -----------------------------------------------------------------------------------------
def llm_layer_params(cfg: Showo2Config, ffn_width: int | None = None) -> int:
    """Weights of one LLM decoder layer's projections (q/k/v, o, gate/up/down at ``ffn_width``)."""
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return h * (q + 2 * kv) + q * h + 3 * h * (cfg.intermediate_size if ffn_width is None else ffn_width)


def llm_layer_numel(cfg: Showo2Config, ffn_width: int | None = None) -> int:
    """Every parameter of one LLM decoder layer: the projections, the q/k/v biases and the two norms."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return llm_layer_params(cfg, ffn_width) + q + 2 * kv + 2 * cfg.hidden_size


def head_block_params(cfg: Showo2Config) -> int:
    d, hq = cfg.head_hidden_size, cfg.head_num_heads * cfg.head_dim_head
    hkv = cfg.head_num_kv_heads * cfg.head_dim_head
    return d * (hq + 2 * hkv) + hq * d + 3 * d * cfg.head_intermediate_size


def image_feature_params(cfg: Showo2Config) -> int:
    """SigLIP stack, both patch embeddings and the fusion MLP, per image token."""
    e, h = cfg.und_hidden_size, cfg.hidden_size
    siglip = cfg.und_num_layers * (4 * e * e + 2 * e * cfg.und_intermediate_size)
    return siglip + cfg.patch_dim * (e + h) + (e + h) * h + h * h


def siglip_attention_flops(cfg: Showo2Config) -> float:
    """The SigLIP stack's attention over one image's tokens."""
    return 4.0 * cfg.num_image_tokens**2 * cfg.und_num_layers * cfg.und_hidden_size


def upstream_gen_call_flops(cfg: Showo2Config, batch_rows: int) -> dict[str, float]:
    """FLOPs of one upstream generation call (2 per multiply-add; dense attention over all L x L).

    At 1.5B, CFG batch 2: 10.0 TFLOP in Linear layers + 0.6 in attention (docs/REFERENCE_MEASUREMENTS.md: 10.0 + 0.66).
    """
    seq, h, d = cfg.max_seq_len, cfg.hidden_size, cfg.head_hidden_size
    q, hq = cfg.num_heads * cfg.head_dim, cfg.head_num_heads * cfg.head_dim_head
    llm = cfg.num_layers * llm_layer_params(cfg) + h * cfg.vocab_size
    head = h * d + d * d + cfg.head_num_layers * head_block_params(cfg) + d * cfg.patch_dim
    linear = 2.0 * batch_rows * (seq * (llm + head) + cfg.num_image_tokens * image_feature_params(cfg))
    attention = 4.0 * batch_rows * seq * seq * (cfg.num_layers * q + cfg.head_num_layers * hq)
    attention += batch_rows * siglip_attention_flops(cfg)
    return {"linear": linear, "attention": attention, "total": linear + attention}


def peak_tflops(device_name: str) -> float | None:
    """The measured bf16 matmul rate of a device (by name), or None."""
    return next((v for k, v in MEASURED_BF16_TFLOPS.items() if k in device_name), None)


def gen_call_flops(cfg: Showo2Config, prefix: int, layers: int, ffn_width: int, trunk: bool,
                   head: bool) -> dict[str, float]:
    """One compiled generation call with CFG (2 rows over the S-position image block, keys prefix + S):
    {"linear", "attention"} FLOPs.

    ``trunk``: SigLIP and fusion (one row: both CFG halves hold the same latents) and ``layers`` LLM layers at
    FFN width ``ffn_width``; ``head``: diff_proj and the head blocks. The time embedding and the FinalLayer
    always run."""
    rows, s = 2, cfg.image_slot_len
    h, d, q = cfg.hidden_size, cfg.head_hidden_size, cfg.num_heads * cfg.head_dim
    hq = cfg.head_num_heads * cfg.head_dim_head
    per_row = cfg.frequency_embedding_size * d + d * d + d * 2 * d  # the time MLP, the FinalLayer's adaLN
    linear = 2.0 * rows * (s * d * cfg.patch_dim + per_row)
    attention = 0.0
    if trunk:
        linear += 2.0 * cfg.num_image_tokens * image_feature_params(cfg)
        linear += 2.0 * rows * (s * layers * llm_layer_params(cfg, ffn_width) + d * h)  # + time_embed_proj
        attention += siglip_attention_flops(cfg) + 4.0 * rows * s * (prefix + s) * layers * q
    if head:
        linear += 2.0 * rows * s * (h * d + d * d + cfg.head_num_layers * head_block_params(cfg))
        linear += 2.0 * rows * cfg.head_num_layers * d * 6 * d  # the blocks' adaLN, per row
        attention += 4.0 * rows * s * (prefix + s) * cfg.head_num_layers * hq
    return {"linear": linear, "attention": attention}


def compiled_prefix_len(cfg: Showo2Config, prompt: list[int]) -> int:
    """The text prefix a compiled generation call computes for ``prompt``: every position of its batch before the
    slot's end, cut as ``compiled_batch`` cuts it, less the slot."""
    return compiled_batch(cfg, build_gen_batch(cfg, [prompt], guided=False)).tokens.shape[1] - cfg.image_slot_len


def gen_image_flops(cfg: Showo2Config, config: FlashUConfig | None, baseline_points: int, prefix: int) -> float:
    """All calls of one image: exact (``config`` None, every call full) or FlashU's schedule."""
    return sum(gen_image_flops_by_kind(cfg, config, baseline_points, prefix).values())


def gen_image_flops_by_kind(cfg: Showo2Config, config: FlashUConfig | None, baseline_points: int,
                            prefix: int) -> dict[str, float]:
    """``gen_image_flops`` apart: {"linear", "attention"} FLOPs of all calls of one image."""
    if config is None:
        call = gen_call_flops(cfg, prefix, cfg.num_layers, cfg.intermediate_size, True, True)
        return {kind: (baseline_points - 1) * flops for kind, flops in call.items()}
    flops = {"linear": 0.0, "attention": 0.0}
    kept = config.kept_ffn_width(cfg.intermediate_size)
    skipped = config.num_skipped_layers(cfg.num_layers)
    for plan in gen_schedule(config, config.num_points(baseline_points) - 1, guidance=0.0):  # CFG scale: no FLOPs
        layers = cfg.num_layers - (skipped if plan.layers == "skip" else 0)
        width = kept if plan.ffn_pruned else cfg.intermediate_size
        call = gen_call_flops(cfg, prefix, layers, width, plan.needs_trunk, plan.head != "reuse")
        for kind in flops:
            flops[kind] += call[kind]
    return flops


# ---- understanding --------------------------------------------------------------------------------------
def und_prefill_flops(cfg: Showo2Config, config: FlashUConfig | None, prompt_len: int) -> dict[str, float]:
    """Image features, the prefill over the prompt and the first token's logits: {"linear", "attention"}
    FLOPs (attention causal, half of the full square)."""
    q, d = cfg.num_heads * cfg.head_dim, cfg.head_hidden_size
    time_token = cfg.frequency_embedding_size * d + d * d + d * cfg.hidden_size  # time MLP, time_embed_proj
    linear = 2.0 * (cfg.num_image_tokens * image_feature_params(cfg) + time_token + cfg.hidden_size * cfg.vocab_size)
    attention = 0.0
    width = cfg.intermediate_size if config is None else config.kept_ffn_width(cfg.intermediate_size)
    cut = config is not None and config.token_prune_ratio > 0
    kept_len = prompt_len - cfg.num_image_tokens + (config.kept_tokens(cfg.num_image_tokens) if cut else 0)
    attention += siglip_attention_flops(cfg)
    for i in range(cfg.num_layers):
        n = kept_len if cut and i > config.token_prune_layer else prompt_len
        linear += 2.0 * n * llm_layer_params(cfg, width)
        attention += 2.0 * n * n * q
    return {"linear": linear, "attention": attention}


def und_decode_bytes(cfg: Showo2Config, config: FlashUConfig | None, prompt_len: int, new_tokens: int,
                     itemsize: int = 2) -> list[float]:
    """Bytes each decode token d = 1 .. new_tokens - 1 must read: its layers' weights, the lm_head, the cache."""
    kv = cfg.num_kv_heads * cfg.head_dim
    width = cfg.intermediate_size if config is None else config.kept_ffn_width(cfg.intermediate_size)
    cut = config is not None and config.token_prune_ratio > 0
    dropped = cfg.num_image_tokens - config.kept_tokens(cfg.num_image_tokens) if cut else 0
    skipping = config is not None and config.skip_ratio > 0 and config.skip_interval > 0
    skipped = config.num_skipped_layers(cfg.num_layers) if skipping else 0
    out = []
    for d in range(1, new_tokens):
        layers = cfg.num_layers - (0 if not skipping or d % config.skip_interval == 0 else skipped)
        cached = [prompt_len - (dropped if cut and i > config.token_prune_layer else 0) + d for i in range(layers)]
        weights = layers * llm_layer_numel(cfg, width) + cfg.hidden_size * (cfg.vocab_size + 1)  # + final norm
        out.append(itemsize * (weights + 2 * kv * sum(cached)))
    return out


# ---- a benchmark row's floor -----------------------------------------------------------------------------
# Measured copy bandwidth by device name fragment (others: not measured). H100 80GB HBM3: 3000 GB/s, the same
# copy (`harness kernels`, two runs: 3001 and 2999).
COPY_GBPS = {"H200": H200_COPY_GBPS, "H100": 3000.0}


def device_rates(device_name: str) -> Rates | None:
    """The measured rates of a device (by name), or None where either was never measured."""
    tflops = peak_tflops(device_name)
    gbps = next((v for k, v in COPY_GBPS.items() if k in device_name), None)
    return None if tflops is None or gbps is None else Rates(tflops, gbps, f"measured on {device_name}")


def row_floor_s(task: str, row: str, cfg: Showo2Config, rates: Rates, steps: int, prefix: int, prompt_len: int,
                new_tokens: int) -> float | None:
    """The floor of what a bench row computes (gen: one image; und: one request), or None where the row is
    not one of the counted paths (the no-cache loop re-runs the prompt per token: its floor is not modelled)."""
    flashu = "flashu" in row
    if task == "gen":
        if row in ("eager", "eager-split"):  # the same work, its lm_head product split or not
            return rates.compute_s((steps - 1) * upstream_gen_call_flops(cfg, 2)["total"])
        if row.startswith(("compiled-", "flashu-")):
            return rates.compute_s(gen_image_flops(cfg, FlashUConfig.for_task("gen") if flashu else None, steps,
                                                   prefix))
        return None
    if row == "eager-nokv" or not (row == "eager-kv" or row.startswith(("compiled-", "flashu-"))):
        return None
    config = FlashUConfig.for_task("und") if flashu else None
    decode = und_decode_bytes(cfg, config, prompt_len, new_tokens)
    prefill = sum(und_prefill_flops(cfg, config, prompt_len).values())
    return rates.compute_s(prefill) + sum(rates.read_s(b) for b in decode)


# ---- report ---------------------------------------------------------------------------------------------
def floors(cfg: Showo2Config, rates: Rates, steps: int, prefix: int, prompt_len: int, new_tokens: int,
           eager: dict[str, float]) -> dict:
    gen_cfg, und_cfg = FlashUConfig.for_task("gen"), FlashUConfig.for_task("und")
    upstream = (steps - 1) * upstream_gen_call_flops(cfg, 2)["total"]
    gen = {name: rates.compute_s(flops) for name, flops in (
        ("upstream", upstream), ("exact", gen_image_flops(cfg, None, steps, prefix)),
        ("flashu", gen_image_flops(cfg, gen_cfg, steps, prefix)))}
    und = {}
    for name, config in (("exact", None), ("flashu", und_cfg)):
        decode = und_decode_bytes(cfg, config, prompt_len, new_tokens)
        prefill_s = rates.compute_s(sum(und_prefill_flops(cfg, config, prompt_len).values()))
        decode_s = sum(rates.read_s(b) for b in decode)
        und[name] = {"prefill_s": prefill_s, "decode_gb_per_token": sum(decode) / len(decode) / 1e9 if decode else 0.0,
                     "decode_s_per_token": decode_s / max(len(decode), 1), "request_s": prefill_s + decode_s}
    return {"preset": cfg.name, "rates": {"tflops": rates.tflops, "gbps": rates.gbps, "source": rates.source},
            "steps": steps,
            "prefix_len": prefix, "prompt_len": prompt_len, "new_tokens": new_tokens, "eager_s": eager,
            "gen_floor_s": gen, "und_floor": und}


def report_tables(report: dict) -> str:

    eager = report["eager_s"]
    gen_rows = [[name, f"{1e3 * s:.0f}", f"{eager['gen'] / s:.1f}x"] for name, s in report["gen_floor_s"].items()]
    und_rows = []
    for name, u in report["und_floor"].items():
        und_rows.append([name, f"{1e3 * u['prefill_s']:.1f}", f"{u['decode_gb_per_token']:.2f}",
                         f"{1e3 * u['decode_s_per_token']:.2f}", f"{1e3 * u['request_s']:.0f}",
                         f"{eager['nokv'] / u['request_s']:.1f}x", f"{eager['kv'] / u['request_s']:.1f}x"])
    rates = report["rates"]
    return "\n".join([
        f"{report['preset']}: floors at {rates['tflops']:.0f} TFLOP/s and {rates['gbps']:.0f} GB/s "
        f"({rates['source']})",
        f"generation, one image ({report['steps']}-point baseline grid, CFG, prefix {report['prefix_len']}); "
        f"eager {eager['gen']} s",
        format_table(["path", "floor ms", "max speedup"], gen_rows),
        "",
        f"understanding, {report['prompt_len']}-position prompt, {report['new_tokens']} new tokens; eager no-cache "
        f"{eager['nokv']} s, KV cache {eager['kv']} s",
        format_table(["path", "prefill ms", "decode GB/token", "decode ms/token", "request ms", "max vs no-cache",
                      "max vs KV cache"], und_rows),
    ])


def main(argv: list[str] | None = None) -> dict:
    parser = command_parser("python -m harness floors", __doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="showo2-7b", help="model shapes")
    parser.add_argument("--tflops", type=float, default=MEASURED_BF16_TFLOPS["H200"],
                        help=f"bf16 matmul TFLOP/s (default: {MEASURED_BF16_TFLOPS['H200']}, measured on an {H200})")
    parser.add_argument("--bandwidth", type=float, default=H200_COPY_GBPS,
                        help=f"copy bandwidth, GB/s (default: {H200_COPY_GBPS}, measured on an {H200})")
    parser.add_argument("--steps", type=int, default=50, help="gen: baseline grid points")
    parser.add_argument("--prefix-len", type=int, default=64, help="gen: text prefix (bos, prompt, boi), bucketed")
    parser.add_argument("--prompt-len", type=int, default=None, help="und: prompt positions (default: slot + 50)")
    parser.add_argument("--new-tokens", type=int, default=32, help="und: tokens per answer")
    for key, what in (("gen", "gen s/image"), ("nokv", "und no-cache s/request"), ("kv", "und KV-cache s/request")):
        parser.add_argument(f"--eager-{key}", type=float, default=None, help=f"eager {what} (default: the anchor)")
    parser.add_argument("--out", type=Path, default=None, help="JSON report path")
    args = parser.parse_args(argv)
    for name in ("tflops", "bandwidth", "steps", "prefix_len", "new_tokens"):
        if getattr(args, name) <= (1 if name == "steps" else 0):
            parser.error(f"--{name.replace('_', '-')} must be positive (steps >= 2), got {getattr(args, name)}")
    cfg = get_config(args.preset)
    anchors = ANCHOR_SECONDS.get(args.preset, {})
    eager = {k: getattr(args, f"eager_{k}") or anchors.get(k) for k in ("gen", "nokv", "kv")}
    missing = [k for k, v in eager.items() if v is None]
    if missing:
        parser.error(f"no anchor for {args.preset}: pass {', '.join(f'--eager-{k}' for k in missing)}")
    measured = (args.tflops, args.bandwidth) == (MEASURED_BF16_TFLOPS["H200"], H200_COPY_GBPS)
    source = f"measured on an {H200}" if measured else "given with --tflops / --bandwidth"
    report = floors(cfg, Rates(args.tflops, args.bandwidth, source), args.steps, args.prefix_len,
                    args.prompt_len or cfg.image_slot_len + 50, args.new_tokens, eager)
    print(report_tables(report))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
