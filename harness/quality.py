"""``python -m harness quality``: what FlashU costs in quality on the trained testbed, row by row, with fidelity.

    python -m harness quality                                    # the shipped testbed; GPU: 200 prompts, 200 questions
    python -m harness quality --weights runs/testbed --task gen --rows baseline,flashu-eager,no_hybrid --batch 1
    python -m harness quality --device cpu --prompts 6 --questions 4 --steps 10   # a CPU smoke run
    torchrun --nproc-per-node 4 -m harness quality                # data parallel: each process scores its share

Generation scores held-out prompts of the testbed world GenEval-style (the scorer reads the decoded image);
understanding scores held-out questions (exact answers). Rows: ``baseline`` (eager), ``flashu-eager`` (the eager
FlashU twin with the testbed's calibrated FFN layout), ``compiled-exact`` and ``compiled-flashu``
(``torch.compile`` with ``flashu_backend``), and the paper's ablations as eager FlashU rows (gen: no_layer_skip,
no_hybrid, no_adaptive_guidance, ffn_pruning_only; und: no_token_pruning, no_layer_skip). Per row: per-category
accuracy with 95% intervals, the overall score and its change against the baseline, and the latency (median seconds
per image / per answer after a warm-up). Fidelity compares each compiled row with its eager twin (decisions, latent
cosine, scorer agreement, score). Writes ``quality.json`` and ``quality_grid.png`` (rows = methods, columns = the
first prompts, the scorer's verdict under each image) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from flashu_fx.calibration import prepare_pruned_model
from flashu_fx.testbed import world
from flashu_fx.testbed.checkpoint import SHIPPED_DIR, Testbed, flashu_config, load_testbed
from harness.arguments import command_parser, display_path, flashu_setting
from harness.compiled_rows import add_backend_option_argument, parsed_backend_options
from harness.devices import DTYPES, auto_threads, device_name, intra_op_threads, resolve_device
from harness.distributed import Ranks, process_group
from harness.quality_eval import question_latents, run_gen_row, run_und_row
from harness.quality_report import task_report, write_grid
from harness.quality_rows import ROWS, Env, RowSpec, select_row_specs

TASK_CHOICES = {"gen": ("gen",), "und": ("und",), "both": ("gen", "und")}


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("python -m harness quality", __doc__,
                       epilog="rows: gen " + ", ".join(ROWS["gen"]) + "; und " + ", ".join(ROWS["und"]))
    p.add_argument("--weights", type=Path, default=SHIPPED_DIR, help="testbed directory (default: the shipped one)")
    p.add_argument("--task", choices=list(TASK_CHOICES), default="both")
    p.add_argument("--rows", default=None, help="comma-separated rows (default: all; the baseline always runs)")
    p.add_argument("--prompts", type=int, default=None, help="held-out prompts (default: 200 on CUDA, 12 on CPU)")
    p.add_argument("--questions", type=int, default=None, help="held-out questions (default: 200 on CUDA, 12 on CPU)")
    p.add_argument("--batch", type=int, default=None,
                   help="prompts per generation call (default: 8 on CUDA, 4 on CPU); 1 compares decisions per prompt")
    p.add_argument("--steps", type=int, default=None, help="baseline grid points (default: the testbed's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the testbed's)")
    p.add_argument("--max-new-tokens", type=int, default=6, help="answer budget (the testbed's answers are short)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of the first batch / question per row")
    p.add_argument("--seed", type=int, default=0, help="held-out set and noise seed (batch j uses seed + j)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto", help="auto: bf16 on CUDA, else fp32")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: 1 for the nano model)")
    p.add_argument("--out", type=Path, default=Path("runs/quality"), help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings", type=flashu_setting,
                   help="a FlashU setting for every FlashU row (repeatable), e.g. token_prune_ratio=0.25 or "
                        "skip_ratio=0.1; an ablation row still turns its own technique off (default: the paper's)")
    add_backend_option_argument(p)
    return p


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser, cuda: bool) -> None:
    """Fill the device-dependent defaults and reject values that cannot run, naming the option."""
    for name, on_cuda, on_cpu in (("prompts", 200, 12), ("questions", 200, 12), ("batch", 8, 4)):
        if getattr(args, name) is None:
            setattr(args, name, on_cuda if cuda else on_cpu)
    for name, low in (("prompts", 1), ("questions", 1), ("batch", 1), ("steps", 2), ("max_new_tokens", 1),
                      ("warmup", 0), ("threads", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if args.guidance is not None and args.guidance <= 0:
        parser.error(f"--guidance must be > 0 (the compiled pipeline needs classifier-free guidance), got "
                     f"{args.guidance}")


def pick_rows(text: str | None, tasks: tuple[str, ...], settings: dict[str, Any], parser: argparse.ArgumentParser
              ) -> dict[str, list[RowSpec]]:
    """Each task's rows among ``--rows`` (a name may belong to one task: no_hybrid is generation's only)."""
    names = None if text is None else [n.strip() for n in text.split(",") if n.strip()]
    if names is not None:
        unknown = [n for n in names if not any(n in ROWS[t] for t in tasks)]
        if unknown:
            allowed = sorted({n for t in tasks for n in ROWS[t]})
            parser.error(f"--rows: unknown row(s) {unknown} for --task {'/'.join(tasks)}: allowed {allowed}")
    try:
        return {t: select_row_specs(t, None if names is None else [n for n in names if n in ROWS[t]], settings)
                for t in tasks}
    except ValueError as err:
        parser.error(f"--rows/--set: {err}")


def prepare_env(args: argparse.Namespace, rows: dict[str, list[RowSpec]], device: torch.device,
                dtype: torch.dtype, options: dict, parser: argparse.ArgumentParser) -> tuple[Env, Testbed]:
    """Load the testbed and, when a FlashU row runs, permute its FFNs for the calibrated layout (in place)."""
    try:
        tb = load_testbed(args.weights, dtype=dtype, device=device)
    except FileNotFoundError as err:
        hint = " (the shipped weights are not there yet: train with `python -m harness train-testbed --out DIR` " \
            "and pass --weights DIR)" if args.weights == SHIPPED_DIR else ""
        parser.error(f"--weights {args.weights}: {err}{hint}")
    flashu_tasks = sorted({s.task for specs in rows.values() for s in specs if s.config is not None})
    layout = None
    if flashu_tasks:
        try:
            calibrations = {t: tb.calibration(t) for t in flashu_tasks}
        except FileNotFoundError as err:
            parser.error(f"--weights {args.weights}: {err} (needed by the FlashU rows)")
        layout = prepare_pruned_model(tb.model, calibrations, {t: flashu_config(t) for t in flashu_tasks})
    steps = args.steps or tb.steps
    guidance = args.guidance or tb.guidance
    return Env(tb.model, tb.tokenizer, layout, steps, guidance, args.max_new_tokens, options), tb


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run the command; returns the report (None on the ranks other than 0 under torchrun)."""
    started = time.perf_counter()
    parser = build_parser()
    args = parser.parse_args(argv)
    options = parsed_backend_options(args, parser)
    ranks = Ranks.from_environment()
    device = ranks.device(resolve_device(args.device))
    check_args(args, parser, device.type == "cuda")
    # Checked before any process group forms; run() reads them from args.
    args.backend_options, args.tasks = options, TASK_CHOICES[args.task]
    args.flashu_settings = dict(args.settings)  # the last of a repeated key wins
    args.row_specs = pick_rows(args.rows, args.tasks, args.flashu_settings, parser)
    with process_group(ranks, device):
        return run(args, parser, ranks, device, argv, started)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, ranks: Ranks, device: torch.device,
        argv: list[str] | None, started: float) -> dict[str, Any] | None:
    """Every row of every task, each rank on its share; rank 0 prints and writes the report."""
    options, tasks, flashu_settings, rows = args.backend_options, args.tasks, args.flashu_settings, args.row_specs
    dtype_name = args.dtype if args.dtype != "auto" else "bf16" if device.type == "cuda" else "fp32"
    dtype = DTYPES[dtype_name]
    env, tb = prepare_env(args, rows, device, dtype, options, parser)
    progress = not args.no_progress
    settings = dict(weights=display_path(args.weights), task=args.task, prompts=args.prompts, questions=args.questions,
                    batch=args.batch, steps=env.steps, guidance=env.guidance, max_new_tokens=args.max_new_tokens,
                    warmup=args.warmup, seed=args.seed, dtype=dtype_name, backend_options=options,
                    flashu_settings=flashu_settings, processes=ranks.world_size,
                    rows={t: [s.name for s in specs] for t, specs in rows.items()})
    report: dict[str, Any] = {
        "device": device_name(device), "torch": torch.__version__,
        "command": "python -m harness quality " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "settings": settings, "testbed": {k: tb.record.get(k) for k in ("command", "steps_done", "sampling")},
    }
    changed = "".join(f", {k}={v}" for k, v in flashu_settings.items())
    processes = f", {ranks.world_size} processes" if ranks.distributed else ""
    if ranks.is_main:
        print(f"quality: testbed {settings['weights']} on {device} ({dtype_name}{processes}), {env.steps} grid "
              f"points, guidance {env.guidance}{changed and ', FlashU with' + changed[1:]}")
        args.out.mkdir(parents=True, exist_ok=True)
    with intra_op_threads(auto_threads(args.threads, device, env.model.config)):
        if "gen" in tasks:
            prompts = world.heldout_gen_prompts(args.prompts, seed=args.seed)
            results = {s.name: run_gen_row(s, env, prompts, args.batch, args.seed, args.warmup, progress, ranks)
                       for s in rows["gen"]}
            if ranks.is_main:
                report["gen"] = task_report("gen", results, [{"caption": p.caption, "category": p.category}
                                                             for p in prompts])
                grid = write_grid(list(results.values()), prompts, args.out / "quality_grid.png",
                                  f"testbed quality: {env.steps} grid points, guidance {env.guidance}, {dtype_name}")
                report["gen"]["grid"] = None if grid is None else str(grid)
                if "und" in tasks:  # a run stopped in its understanding half keeps the generation half
                    write_report(report, args.out / "quality.json", started)
        if "und" in tasks:
            items = world.heldout_questions(args.questions, seed=args.seed)
            latents = question_latents(items, device, dtype)
            results = {s.name: run_und_row(s, env, items, latents, args.warmup, progress, ranks) for s in rows["und"]}
            if ranks.is_main:
                report["und"] = task_report("und", results, [{"question": it.question, "answer": it.answer,
                                                              "kind": it.kind} for it in items])
    torch._dynamo.reset()  # drop the compiled rows' Dynamo cache entries (the caller may compile again)
    if not ranks.is_main:
        return None
    path = write_report(report, args.out / "quality.json", started)
    print(f"wrote {path}" + (f" and {report['gen']['grid']}" if report.get("gen", {}).get("grid") else ""))
    return report


def write_report(report: dict[str, Any], path: Path, started: float) -> Path:
    """The report as it stands (``tasks_done``: the tasks in it so far, in order) and the seconds since ``started``."""
    report["tasks_done"] = [task for task in ("gen", "und") if task in report]
    report["seconds"] = round(time.perf_counter() - started, 1)
    path.write_text(json.dumps(report, indent=1, default=float))
    return path
