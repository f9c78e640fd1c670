"""Profile one compiled answer at real shapes: the prefill and each decode token apart, kernel by kernel.

    python -m harness.profile_und --preset showo2-7b [--exact] [--option tune_decode=off]

An answer of one token is the prefill (image features, the prompt through every layer, the first id); an answer of
N tokens adds N - 1 decode steps. Timings are medians of interleaved answers of both lengths, the device synchronised
around each; the decode step's kernels are the N-token answer's profile less the one-token answer's, per token. The
decode floor is the bytes a token must read (kept weights, lm_head, the cache; ``harness.floors``) at the measured
copy bandwidth. On the CPU the tables list operators instead of kernels (a check of the command, not a profile).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from flashu_fx.compiled import answer_question_compiled, flashu_backend
from flashu_fx.config import get_config
from flashu_fx.flashu_config import FlashUConfig
from flashu_fx.layout import build_mmu_prompt
from flashu_fx.tokenizer import get_tokenizer
from harness import floors
from harness.arguments import command_parser
from harness.compiled_rows import add_backend_option_argument, parsed_backend_options
from harness.devices import resolve_device
from harness.flashu_rows import permute_for, random_ffn_scores
from harness.profile_gen import kernel_kind
from harness.random_model import build_random_model, und_question_ids
from harness.rows import timed


@dataclass(frozen=True)
class OpStat:
    """One kernel (CUDA) or operator (CPU) of a profile: how often it ran and its self time in us."""

    count: float
    us: float


def op_stats(prof, device: torch.device) -> dict[str, OpStat]:
    """Name -> ``OpStat`` of a ``torch.profiler`` run: device kernels and copies on CUDA (inside CUDA graphs too),
    operators' own CPU time on the CPU."""
    stats = {}
    for event in prof.key_averages():
        us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if us > 0 and (device.type != "cuda" or event.device_type.name == "CUDA"):
            stats[event.key] = OpStat(event.count, us)
    return stats


def per_token(longer: dict[str, OpStat], shorter: dict[str, OpStat], tokens: int) -> dict[str, OpStat]:
    """What ``tokens`` extra steps added to a profile, per step: ``longer`` less ``shorter``, divided by ``tokens``
    (names only in ``shorter`` are dropped; a difference at or below zero is profiling noise and dropped too)."""
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    out = {}
    for name, stat in longer.items():
        base = shorter.get(name, OpStat(0, 0.0))
        if stat.us - base.us > 0:
            out[name] = OpStat((stat.count - base.count) / tokens, (stat.us - base.us) / tokens)
    return out


def stat_table(stats: dict[str, OpStat], rows: int, unit: str) -> str:
    """The ``rows`` slowest entries: us and calls (per ``unit``), their share of the total."""
    total = sum(s.us for s in stats.values()) or 1.0
    lines = [f"{'us':>9s} {'share':>6s} {'calls':>7s}  kernel (per {unit})"]
    for name, stat in sorted(stats.items(), key=lambda item: -item[1].us)[:rows]:
        lines.append(f"{stat.us:9.1f} {100 * stat.us / total:5.1f}% {stat.count:7.1f}  {name[:80]}")
    lines.append(f"{total:9.1f} 100.0% {sum(s.count for s in stats.values()):7.1f}  all")
    return "\n".join(lines)


def kind_stats(stats: dict[str, OpStat]) -> dict[str, OpStat]:
    """``stats`` summed per ``harness.profile_gen.kernel_kind`` (matrix product, attention, Triton, copies...)."""
    kinds: dict[str, OpStat] = {}
    for name, stat in stats.items():
        kind = kernel_kind(name)
        total = kinds.get(kind, OpStat(0, 0.0))
        kinds[kind] = OpStat(total.count + stat.count, total.us + stat.us)
    return kinds


def main(argv: list[str] | None = None) -> dict:
    parser = command_parser("python -m harness.profile_und", __doc__)
    parser.add_argument("--preset", default="showo2-7b", help="model shapes")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: cuda when available")
    parser.add_argument("--exact", action="store_true", help="exact optimizations only (no FlashU)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens of the long answer (>= 2)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt positions incl. the image (slot + 50)")
    parser.add_argument("--repeats", type=int, default=10, help="timed answers of each length")
    parser.add_argument("--rows", type=int, default=15, help="kernels listed per table")
    add_backend_option_argument(parser)
    args = parser.parse_args(argv)
    options = parsed_backend_options(args, parser)
    for name, low in (("new_tokens", 2), ("repeats", 1), ("rows", 1)):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: allowed an integer >= {low}")
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = get_config(args.preset)
    model = build_random_model(cfg, device, dtype)
    config = layout = None
    if not args.exact:
        config = FlashUConfig.for_task("und")
        layout = permute_for(model, config, random_ffn_scores(model))
    tok = get_tokenizer(cfg)
    prompt_len = args.prompt_len or cfg.image_slot_len + 50
    question = und_question_ids(cfg, tok, prompt_len)
    prompt_len = build_mmu_prompt(cfg, tok, question).tokens.shape[1]
    latents = torch.randn(1, cfg.latent_channels, *cfg.latent_size, generator=torch.Generator().manual_seed(0))
    latents = latents.to(device, dtype)
    torch._dynamo.reset()  # this run's compiles start from a clean Dynamo cache
    backend = flashu_backend("und", config, layout, **options)
    und = torch.compile(model, backend=backend)

    def answer(tokens: int) -> float:
        return timed(lambda: answer_question_compiled(und, backend, latents, question, tok, max_new_tokens=tokens,
                                                      stop_at_eos=False), device)[1]

    first = answer(args.new_tokens)  # compiles; then both lengths warm (their CUDA graphs captured)
    for tokens in (1, args.new_tokens, 1):
        answer(tokens)
    short, long = [], []
    for _ in range(args.repeats):  # interleaved: both lengths see the same machine
        short.append(answer(1))
        long.append(answer(args.new_tokens))
    prefill_ms = 1000 * statistics.median(short)
    decode_ms = 1000 * (statistics.median(long) - statistics.median(short)) / (args.new_tokens - 1)

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiles = {}
    for tokens in (1, args.new_tokens):
        with torch.profiler.profile(activities=activities) as prof:
            answer(tokens)
        profiles[tokens] = op_stats(prof, device)
    decode = per_token(profiles[args.new_tokens], profiles[1], args.new_tokens - 1)
    busy_us = sum(s.us for s in decode.values())

    floor_bytes = statistics.mean(floors.und_decode_bytes(cfg, config, prompt_len, args.new_tokens))
    rates = floors.device_rates(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    floor_ms = None if rates is None else 1000 * floor_bytes / (rates.gbps * 1e9)
    what = "kernels" if device.type == "cuda" else "operators (CPU: a check of the command)"
    print(f"{args.preset} und {'exact' if args.exact else 'FlashU'} on {device}, {prompt_len}-position prompt, "
          f"{args.new_tokens} tokens; options {options}")
    print(f"first answer (compile) {first:.1f} s; part compilations {sum(backend.piece_captures.values())} "
          f"({sum(backend.part_compile_seconds.values()):.1f} s)")
    print(f"prefill (one-token answer) {prefill_ms:.2f} ms; decode {decode_ms:.3f} ms per token "
          f"(medians of {args.repeats})")
    if floor_ms is not None:
        print(f"decode floor {floor_ms:.3f} ms per token ({floor_bytes / 1e9:.2f} GB at {rates.gbps:.0f} GB/s): "
              f"{100 * floor_ms / decode_ms:.0f}% of it reached")
    print(f"decode {what} per token: {sum(s.count for s in decode.values()):.1f}, busy {busy_us / 1000:.3f} ms "
          f"of the {decode_ms:.3f} ms measured")
    print(stat_table(decode, args.rows, "decode token"))
    print(stat_table(kind_stats(decode), args.rows, "decode token, by kind"))
    print(f"prefill {what}:")
    print(stat_table(profiles[1], args.rows, "prefill"))
    print(stat_table(kind_stats(profiles[1]), args.rows, "prefill, by kind"))
    return {"preset": args.preset, "device": str(device), "exact": args.exact, "options": options,
            "prompt_len": prompt_len, "new_tokens": args.new_tokens, "first_answer_s": round(first, 2),
            "prefill_ms": prefill_ms, "decode_ms_per_token": decode_ms, "decode_floor_ms": floor_ms,
            "decode_busy_ms": busy_us / 1000, "decode_kernels_per_token": sum(s.count for s in decode.values())}


if __name__ == "__main__":
    main()
