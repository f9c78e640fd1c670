"""``python -m harness bench``: time every registered row of a task at the real shapes, random weights.

    python -m harness bench --task gen --preset showo2-1.5b --repeats 3 --warmup 1   # runs/bench/bench_gen.json
    python -m harness bench --task und --preset showo2-7b --rows eager-kv
    python -m harness bench --task gen --preset tiny --device cpu --repeats 1      # smoke test
    python -m harness bench --task gen --batch 8 --rows eager-split,compiled-flashu   # 8 prompts per call

Weight values do not change the time of a dense step, so the model is built on the meta device and filled
with random, non-degenerate values on the target device (seconds at 7B). Timed region as docs/REFERENCE_MEASUREMENTS.md:
gen = the whole denoising loop for one prompt (50-point grid = 49 calls, CFG batch 2, guidance 10);
und = ``answer_question`` end to end (image features, prefill, exactly 32 new tokens: the eos stop is off)
for a ~780-position prompt. Each row: warm-up runs, then the median of ``--repeats`` runs (eager rows:
``--eager-repeats``, 5 by default, as host-bound eager loops are the noisiest; fewer for a large batch) with
``torch.cuda.synchronize`` on both sides. Speedups are against the task's baseline row of the same run, and
for generation also against ``eager-split`` when it runs: upstream's work with the lm_head product split, since
the single product takes a slow cuBLAS path on an H200 that no ratio should rest on. ``--batch N`` times N
prompts of mixed lengths per call and reports images per second. On a GPU with NVML (``nvidia-ml-py``) each row
also reports the SM clock and power it held over its timed runs (``harness.clocks``) and, for generation, its share
of the floor at that clock: a long run of products holds an H100 at its power limit, below the full clock the
floor's peak rate was measured at.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flashu_fx.config import PRESETS, Showo2Config, get_config
from flashu_fx.flashu_config import FlashUConfig
from flashu_fx.layout import build_mmu_prompt
from flashu_fx.model import Showo2
from harness.arguments import command_parser
from harness.devices import DTYPES, auto_threads, device_name, intra_op_threads, resolve_device
from harness.floors import compiled_prefix_len, device_rates, peak_tflops, row_floor_s, upstream_gen_call_flops
from harness.random_model import ChunkTokenizer, build_random_model, und_question_ids
from harness.rows import (
    BASELINES,
    SPLIT_BASELINE,
    TASKS,
    GenContext,
    RowResult,
    UndContext,
    compare,
    fit_prompt,
    load_optional_rows,
    select_rows,
    split_row_names,
    summarize,
    synchronize,
    time_row,
)
from harness.tables import format_table

# A DPG-Bench-like prompt (its length does not change the eager time: all 1024 positions always run).
GEN_PROMPT = (
    "A red vintage bicycle leaning against a weathered brick wall covered in ivy, warm late-afternoon light, "
    "a small white dog sitting beside the front wheel."
)


# ---- profiling and reporting ---------------------------------------------------------------------------
def profile_table(run, device: torch.device, row_limit: int = 30) -> str:
    """One run under torch.profiler: the ops and kernels with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), profile(activities=activities) as prof:
        run()
        synchronize(device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=row_limit, max_name_column_width=70)


def profile_row(fn, ctx, device: torch.device) -> str:
    """Prepare the row again, run it once untimed, then profile one run."""
    with torch.no_grad():
        prepared = fn(ctx)
        prepared.run()
    return profile_table(prepared.run, device)


def row_record(task: str, r: RowResult, base: RowResult, flops_per_call: float | None, peak: float | None,
               split: RowResult | None = None) -> dict:
    """One row of the report; ``split``: the ``eager-split`` row when it ran (a second speedup, against upstream's
    work without cuBLAS's slow lm_head path)."""
    rec = {
        "name": r.name,
        "note": r.note,
        "seconds": r.seconds,
        "times": r.times,
        "count": r.count,
        "unit": r.unit,
        "ms_per_unit": r.ms_per_unit,
        "speedup": base.seconds / r.seconds,
        "speedup_vs_split": None if split is None else split.seconds / r.seconds,
        "peak_mem_gb": r.peak_mem_gb,
        "check": compare(task, r.output, base.output),
        "summary": summarize(task, r.output),
        "clocks": r.clocks,  # the SM clock and power over the timed runs (None: none read)
    }
    if flops_per_call is not None and r.name == BASELINES[task]:  # the work of other rows is not upstream's
        rec["tflop_per_s"] = flops_per_call * r.count / r.seconds / 1e12
        rec["pct_of_peak"] = None if peak is None else 100 * rec["tflop_per_s"] / peak
    return rec


def report_table(records: list[dict]) -> str:
    """The report's rows as a text table; "img/s" for generation, "vs split" where ``eager-split`` ran."""
    images = any("images_per_s" in rec for rec in records)
    vs_split = any(rec.get("speedup_vs_split") is not None for rec in records)
    clocks = any(rec.get("clocks") for rec in records)
    at_clock = any(rec.get("pct_of_floor_at_clock") is not None for rec in records)
    headers = ["row", "seconds", "count", "ms/unit", *(["img/s"] if images else []), "speedup",
               *(["vs split"] if vs_split else []), "of floor", *(["at clock"] if at_clock else []),
               *(["SM clock, power"] if clocks else []), "peak GB", "check", "note"]
    rows = []
    for rec in records:
        check = ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in rec["check"].items())
        mem = "-" if rec["peak_mem_gb"] is None else f"{rec['peak_mem_gb']:.2f}"
        count, ms = f"{rec['count']} {rec['unit']}", f"{rec['ms_per_unit']:.2f}"
        floor = "-" if rec.get("pct_of_floor") is None else f"{rec['pct_of_floor']:.0f}%"
        held = rec.get("pct_of_floor_at_clock")
        extra = []
        if at_clock:
            extra.append("-" if held is None else f"{held:.0f}%")
        if clocks:
            extra.append(_clock_cell(rec.get("clocks")))
        rows.append([rec["name"], f"{rec['seconds']:.3f}", count, ms,
                     *([f"{rec['images_per_s']:.2f}"] if images else []), f"{rec['speedup']:.2f}x",
                     *([f"{rec['speedup_vs_split']:.2f}x"] if vs_split else []), floor, *extra, mem, check,
                     rec["note"]])
    return format_table(headers, rows)


def _clock_cell(clock: dict | None) -> str:
    """``ClockSampler.summary()`` as "1650 MHz (83%), 693 W" (the share of the full clock where it is known)."""
    if not clock:
        return "-"
    share = f" ({100 * clock['share_of_full']:.0f}%)" if clock["share_of_full"] else ""
    return f"{clock['median_mhz']:.0f} MHz{share}, {clock['median_w']:.0f} W"


# ---- CLI -----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = command_parser("python -m harness bench", __doc__)
    p.add_argument("--task", choices=TASKS, default="gen", help="gen: text-to-image; und: understanding")
    p.add_argument("--preset", choices=sorted(PRESETS), default="showo2-1.5b", help="model shapes")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (the median is reported)")
    p.add_argument("--eager-repeats", type=int, default=5,
                   help="timed runs of each eager row (instead of --repeats): eager loops are host-bound, and single "
                        "runs on a shared host varied by up to 1.5x where compiled rows (CUDA graphs) varied 0.3%%; "
                        "at --batch 8 one eager run of 1.5B takes 15 s on an H200")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per row before timing")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON report path (default: runs/bench/bench_<task>.json, one file per task)")
    p.add_argument(
        "--rows",
        type=split_row_names,
        default=None,
        help="comma-separated row names (default: every registered row of the task; the baseline always runs); "
        "a compiled row takes flashu_backend options as a variant: 'compiled-flashu[tune_decode=off]'",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="model weights and activations (default: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: cuda when available")
    p.add_argument("--seed", type=int, default=0, help="weights, noise and image latents")
    p.add_argument("--steps", type=int, default=50, help="gen: grid points (model calls = steps - 1)")
    p.add_argument("--guidance", type=float, default=10.0, help="gen: CFG scale (0 = no CFG, batch 1)")
    p.add_argument("--batch", type=int, default=1,
                   help="gen: prompts per call, of mixed lengths (the bench prompt and shorter cuts of it); CFG "
                        "doubles the rows. The table adds images per second")
    p.add_argument("--max-new-tokens", type=int, default=32, help="und: tokens generated (eos stop off)")
    p.add_argument(
        "--prompt-len", type=int, default=None, help="und: prompt positions incl. the image slot (default: slot + 50)"
    )
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: 1 for tiny models on CPU)")
    p.add_argument(
        "--profile", action="store_true", help="after all timings, profile one run per row; tables go in the JSON"
    )
    p.add_argument("--chart", type=Path, default=None,
                   help="also draw the rows (seconds, speedup, floor) as a PNG here (needs matplotlib: [plots])")
    return p


def resolve_defaults(args: argparse.Namespace, device: torch.device) -> None:
    """Fill the defaults that depend on the device or the task: ``--dtype`` (bf16 on CUDA; fp32 on the CPU, where
    most processors have no fast bf16 matmul) and ``--out`` (runs/bench/bench_<task>.json: the two tasks' reports do
    not overwrite each other, and runs/ is git-ignored)."""
    if args.dtype is None:
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    if args.out is None:
        args.out = Path("runs") / "bench" / f"bench_{args.task}.json"


def min_gen_steps() -> int:
    """The fewest --steps every gen row runs with: FlashU rows run round(0.7 * steps) grid points, at least 2."""
    return FlashUConfig.for_task("gen").min_baseline_points()


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    for name, low in (("repeats", 1), ("eager_repeats", 1), ("warmup", 0), ("steps", min_gen_steps()),
                      ("max_new_tokens", 1), ("threads", 1), ("batch", 1)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.task == "und" and args.batch != 1:
        parser.error(f"--batch {args.batch} is for --task gen; an understanding request answers one question")


def bench_prompts(ids: list[int], count: int) -> list[list[int]]:
    """``count`` prompts of mixed lengths: ``ids``, then ever shorter cuts of it, down to about half its length
    (a batch whose rows have different image-slot offsets, as a real batch of prompts has)."""
    return [ids[: max(1, len(ids) - i * len(ids) // (2 * count))] for i in range(count)]


def make_context(args: argparse.Namespace, model: Showo2, device: torch.device):
    cfg, tok = model.config, ChunkTokenizer(model.config)
    if args.task == "gen":
        prompts = bench_prompts(fit_prompt(cfg, tok.encode(GEN_PROMPT), "the bench prompt"), args.batch)
        return GenContext(model, prompts, args.steps, args.guidance, args.seed, tok)
    gen = torch.Generator().manual_seed(args.seed)
    latents = torch.randn(1, cfg.latent_channels, *cfg.latent_size, generator=gen).to(device)
    prompt_len = args.prompt_len or cfg.image_slot_len + 50
    question = und_question_ids(cfg, tok, prompt_len)
    return UndContext(model, latents, question, tok, args.max_new_tokens, stop_at_eos=False)


def measure(args: argparse.Namespace, rows: dict, model: Showo2, ctx) -> tuple[list[RowResult], dict[str, str]]:
    """Time every row, then (with --profile) profile each: profiles come after all timings because
    torch.profiler leaves CUPTI attached (pytorch/pytorch#144455) and that slows later kernel launches in
    the process; in one H200 run a launch-bound 1.5B generation call took 56.7 ms after a profiler session
    against 43.9 ms before."""
    device = next(model.parameters()).device
    results: list[RowResult] = []
    for row_name, fn in tqdm(rows.items(), desc="rows", leave=False):
        eager = not row_name.startswith("compiled")  # eager loops: host-bound, the noisiest rows
        repeats = args.eager_repeats if eager else args.repeats
        r = time_row(args.task, row_name, fn, ctx, args.warmup, repeats)
        results.append(r)
        print(f"  {row_name}: {r.seconds:.3f} s median of {r.times}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    profiles = {name: profile_row(fn, ctx, device) for name, fn in rows.items()} if args.profile else {}
    return results, profiles


def add_floors(args, cfg: Showo2Config, ctx, device: str, records: list[dict]) -> None:
    """Each row's physical floor (``harness.floors``) and the share of it the row reached; None where the
    device's rates were never measured or the row's path is not modelled."""
    rates = device_rates(device)
    prefixes, prompt_len = [0], 0
    if rates is not None and args.task == "gen":  # one image per prompt, each with its own text prefix
        prefixes = [compiled_prefix_len(cfg, p) for p in ctx.prompts]
    elif rates is not None:
        prompt_len = build_mmu_prompt(cfg, ctx.tokenizer, ctx.question).tokens.shape[1]
    for rec in records:
        floors = [] if rates is None else [row_floor_s(args.task, rec["name"], cfg, rates, args.steps, prefix,
                                                       prompt_len, rec["count"]) for prefix in prefixes]
        floor = None if not floors or None in floors else sum(floors)
        rec["floor_s"] = floor
        rec["pct_of_floor"] = None if floor is None else 100 * floor / rec["seconds"]
        # generation's floor is FLOPs at the peak rate, which scales with the SM clock: the share at the clock the
        # card held (understanding's decode floor is bytes, which the SM clock does not set)
        share = (rec.get("clocks") or {}).get("share_of_full")
        at_clock = args.task == "gen" and floor is not None and share
        rec["pct_of_floor_at_clock"] = rec["pct_of_floor"] / share if at_clock else None


def build_report(args, argv, model: Showo2, ctx, results: list[RowResult], profiles: dict[str, str]) -> dict:
    cfg, name = model.config, device_name(next(model.parameters()).device)
    rows_per_call = args.batch * (2 if args.guidance != 0 else 1)
    flops = upstream_gen_call_flops(cfg, rows_per_call) if args.task == "gen" else None
    split = next((r for r in results if r.name == SPLIT_BASELINE), None) if args.task == "gen" else None
    records = [row_record(args.task, r, results[0], flops and flops["total"], peak_tflops(name), split)
               for r in results]
    for rec in records:
        if args.task == "gen":
            rec["images_per_s"] = args.batch / rec["seconds"]
    for rec in records:
        if rec["name"] in profiles:
            rec["profile"] = profiles[rec["name"]]
    add_floors(args, cfg, ctx, name, records)
    report = {
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "preset": args.preset,
        "dtype": args.dtype,
        "task": args.task,
        "command": "python -m harness " + shlex.join(argv),
        "baseline": BASELINES[args.task],
        "settings": {**vars(args), "out": str(args.out), "chart": args.chart and str(args.chart)},
        # Launch-path settings that change how far the host can run ahead of the GPU (CUDA graphs of ~1000
        # kernels fill the default launch queue: the host then waits, and its per-call work shows as GPU idle).
        "env": {k: os.environ.get(k) for k in ("CUDA_SCALE_LAUNCH_QUEUES", "CUDA_LAUNCH_BLOCKING")},
        "weights_gb": sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9,
        "upstream_flop_per_call": flops,
        "rows": records,
    }
    if args.task == "und":  # the positions actually prefilled
        report["settings"]["prompt_len"] = build_mmu_prompt(cfg, ctx.tokenizer, ctx.question).tokens.shape[1]
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(args, parser)
    argv = sys.argv[1:] if argv is None else ["bench", *argv]
    device, cfg = resolve_device(args.device), get_config(args.preset)
    resolve_defaults(args, device)
    dtype = DTYPES[args.dtype]
    load_optional_rows()
    try:
        rows = select_rows(args.task, args.rows)
    except ValueError as err:
        parser.error(str(err))
    with intra_op_threads(auto_threads(args.threads, device, cfg)):
        model = build_random_model(cfg, device, dtype, args.seed)
        ctx = make_context(args, model, device)
        print(f"bench {args.task} {args.preset} {args.dtype} on {device_name(device)}: rows {list(rows)}", flush=True)
        results, profiles = measure(args, rows, model, ctx)
    report = build_report(args, argv, model, ctx, results, profiles)
    print(report_table(report["rows"]))
    flops, base = report["upstream_flop_per_call"], report["rows"][0]
    if flops is not None:
        pct = "" if base.get("pct_of_peak") is None else f" ({base['pct_of_peak']:.0f}% of the measured peak)"
        print(f"{base['name']}: {flops['total'] / 1e12:.3g} TFLOP per call, {base['tflop_per_s']:.3g} TFLOP/s{pct}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    if args.chart is not None:
        try:
            from harness.charts import save_bench_chart

            print(f"wrote {save_bench_chart(report, args.chart)}")
        except ImportError:
            print("matplotlib is not installed: no chart (pip install -e '.[plots]')")
    return report


if __name__ == "__main__":
    main()
