"""First-compile time and recompiles at real shapes: one compiled FlashU model, prompts of many lengths.

    python -m harness.check_recompiles --preset showo2-1.5b --task gen
    python -m harness.check_recompiles --preset showo2-1.5b --task und --option merge_projections=off

Warm-up: one request of the first length, then a second of the same length (the first compiles every part, symbolic in
the prompt length; the second captures the CUDA graphs a length's second use captures). Then one request per length,
every other length new: every compilation of a part after the warm-up is a recompile.
CUDA-graph captures (no compilation: a new length or skip set) and variant builds (FlashU's passes run again for a
plan not met in the warm-up) are counted apart.
FFN layouts are random (timing and compilation do not depend on which neurons are kept).
"""

from __future__ import annotations

import json
import time
from collections import Counter

import torch

from flashu_fx.compiled import answer_question_compiled, flashu_backend, generate_images_compiled, lean_guard_options
from flashu_fx.config import get_config
from flashu_fx.flashu_config import FlashUConfig
from harness.arguments import command_parser
from harness.compiled_rows import add_backend_option_argument, parsed_backend_options
from harness.devices import resolve_device
from harness.flashu_rows import permute_for, random_ffn_scores
from harness.random_model import build_random_model

GEN_LENGTHS = (1, 5, 12, 20, 31, 47, 64, 65, 90, 128)  # prompt ids (the text prefix adds bos and boi)
UND_LENGTHS = (2, 6, 13, 21, 30, 44, 57, 70, 96, 120)  # question ids


def default_lengths(task: str, budget: int) -> tuple[int, ...]:
    """The lengths tried when ``--lengths`` is not given: for generation, those within the preset's prompt
    ``budget``, ending at the budget itself where some were longer (a small preset keeps a range of lengths)."""
    if task == "und":
        return UND_LENGTHS
    within = tuple(n for n in GEN_LENGTHS if n < budget)
    return within + (budget,) if len(within) < len(GEN_LENGTHS) else GEN_LENGTHS


def main(argv: list[str] | None = None) -> dict:
    parser = command_parser("python -m harness.check_recompiles", __doc__)
    parser.add_argument("--preset", default="showo2-1.5b", help="model shapes")
    parser.add_argument("--task", choices=["gen", "und"], default="gen", help="gen: text-to-image; und: understanding")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: cuda when available")
    parser.add_argument("--steps", type=int, default=50, help="gen: baseline grid points")
    parser.add_argument("--new-tokens", type=int, default=8, help="und: tokens per answer")
    parser.add_argument("--lengths", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                        help="prompt (gen) or question (und) lengths, comma-separated; the first warms up "
                        "(default: ten from 1 to 128 for gen, cut at the preset's prompt budget; 2 to 120 for und)")
    add_backend_option_argument(parser)
    args = parser.parse_args(argv)
    options = parsed_backend_options(args, parser)
    budget = get_config(args.preset).max_text_len
    lengths = args.lengths or default_lengths(args.task, budget)
    if min(lengths) < 1 or (args.task == "gen" and max(lengths) > budget):
        allowed = ">= 1" if args.task == "und" else f"1..{budget} (the prompt budget of {args.preset})"
        parser.error(f"--lengths {','.join(map(str, lengths))} is invalid: allowed lengths {allowed}")
    torch._dynamo.reset()  # this run's compiles start from a clean Dynamo cache (see compiled_rows)
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_random_model(get_config(args.preset), device, dtype)
    config = FlashUConfig.for_task(args.task)
    layout = permute_for(model, config, random_ffn_scores(model))
    backend = flashu_backend(args.task, config, layout, **options)
    compiled = torch.compile(model, backend=backend, options=lean_guard_options())
    cfg = model.config
    latents = torch.randn(1, cfg.latent_channels, *cfg.latent_size, generator=torch.Generator().manual_seed(0))
    latents = latents.to(device, dtype)

    def request(n: int) -> None:
        ids = [100 + i % 1000 for i in range(n)]
        if args.task == "gen":
            generate_images_compiled(compiled, backend, [ids], baseline_steps=args.steps)
        else:
            answer_question_compiled(compiled, backend, latents, ids, max_new_tokens=args.new_tokens,
                                     stop_at_eos=False)
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    request(lengths[0])
    first = time.perf_counter() - start
    request(lengths[0])
    warm, warm_graphs = Counter(backend.piece_captures), backend.cuda_graph_captures
    warm_seconds = Counter(backend.part_compile_seconds)
    warm_variants = backend.variant_builds
    seconds = []
    for n in lengths:
        start = time.perf_counter()
        request(n)
        seconds.append(time.perf_counter() - start)
    recompiles = sum((Counter(backend.piece_captures) - warm).values())
    report = {
        "preset": args.preset, "task": args.task, "device": str(device), "options": options,
        "lengths": list(lengths),
        "first_request_s": round(first, 1), "warm_piece_captures": sum(warm.values()),
        # the compiler's share of the warm-up (the rest: Dynamo's capture, FlashU's passes, first runs and CUDA graphs)
        "warm_part_compile_s": round(sum(warm_seconds.values()), 1),
        "slowest_parts_s": {name: round(t, 2) for name, t in warm_seconds.most_common(5)},
        "recompiles_after_warmup": recompiles, "whole_graph_captures": backend.compiles,
        "cuda_graph_captures_after_warmup": backend.cuda_graph_captures - warm_graphs,
        # FlashU's passes rerun for a plan not met in warm-up (a new skip set), never for a length
        "variant_builds_after_warmup": backend.variant_builds - warm_variants,
        "seconds_per_request": [round(s, 3) for s in seconds],
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
