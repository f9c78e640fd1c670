"""The printed tables and the JSON records of ``python -m harness quality``, and its grid of images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flashu_fx.testbed import world
from flashu_fx.testbed.scorer import LAYOUT_CATEGORIES, MISS_CAUSES
from harness.quality_eval import GenRowResult, UndRowResult, group_scores, overall_score
from harness.quality_fidelity import twin_fidelity
from harness.quality_rows import BASELINE
from harness.tables import format_table

GRID_COLUMNS = 12  # prompts shown in the grid
UNITS = {"gen": "image", "und": "answer"}
PLURAL = {"prompt": "prompts", "batch": "batches", "question": "questions"}


def relative_drop(score: float, baseline: float) -> float | None:
    """(row - baseline) / baseline in %, None when the baseline scores 0."""
    return None if baseline == 0 else 100.0 * (score - baseline) / baseline


def fmt_interval(interval: tuple[float, float]) -> str:
    return f"[{interval[0]:.2f}, {interval[1]:.2f}]"


def row_table(task: str, results: list[GenRowResult] | list[UndRowResult]) -> str:
    """One line per row: overall, its interval, the change against the baseline, latency, per-group accuracy."""
    base = overall_score(results[0].summary).accuracy
    groups = list(group_scores(results[0].summary))
    lines = []
    for r in results:
        overall = overall_score(r.summary)
        drop = relative_drop(overall.accuracy, base)
        per_group = group_scores(r.summary)
        lines.append([r.spec.name, f"{overall.accuracy:.3f}", fmt_interval(overall.interval),
                      "n/a" if drop is None else f"{drop:+.1f}%", f"{r.seconds_per_item:.3f}",
                      *(f"{per_group[g].accuracy:.2f}" if g in per_group else "-" for g in groups)])
    headers = ["row", "overall", "95% CI", "vs baseline", f"s/{UNITS[task]}", *groups]
    return format_table(headers, lines)


def miss_table(results: list[GenRowResult]) -> str | None:
    """How each generation row's layout prompts miss: one column per (category, cause) of ``scorer.MISS_CAUSES``,
    prompts per cell; None when no row scored a layout prompt."""
    columns = [(c, cause) for c in LAYOUT_CATEGORIES if any(c in r.miss_causes for r in results)
               for cause in MISS_CAUSES[c]]
    if not columns:
        return None
    lines = [[r.spec.name, *(r.miss_causes.get(c, {}).get(cause, 0) for c, cause in columns)] for r in results]
    return format_table(["row", *(f"{c}: {cause}" for c, cause in columns)], lines)


def count(n: int, unit: str) -> str:
    return f"{n} {unit if n == 1 else PLURAL[unit]}"


def acceptance(passes: dict[str, bool]) -> str:
    """``decisions pass, latent_cosine FAIL, ...``"""
    return ", ".join(f"{k} {'pass' if ok else 'FAIL'}" for k, ok in passes.items())


def fidelity_lines(task: str, report: dict[str, Any]) -> list[str]:
    lines = []
    for f in report.values():
        score = (f"score {f['score_difference']:+.3f} ("
                 f"{'inside' if f['within_interval'] else 'OUTSIDE'}"
                 f" the {f['reference']} interval {fmt_interval(f['reference_interval'])})")
        if task == "gen":
            c = f["latent_cosine"]
            lines.append(f"{f['candidate']} vs {f['reference']}: identical decisions on {f['identical_decisions']:.1%} "
                         f"of {count(f['batches'], f['decision_unit'])}; latent cosine median {c['median']:.5f}, min "
                         f"{c['min']:.5f}; scorer agreement {f['scorer_agreement']:.1%}; {score}")
        else:
            lines.append(f"{f['candidate']} vs {f['reference']}: identical decisions on {f['identical_decisions']:.1%} "
                         f"of {count(f['questions'], 'question')} (kept tokens {f['same_kept_tokens']:.1%}, skips "
                         f"{f['same_skip_decisions']:.1%}); up to ties within {f['tie_tolerance']:.2%} of the "
                         f"threshold {f['identical_decisions_up_to_ties']:.1%} (kept tokens "
                         f"{f['same_kept_tokens_up_to_ties']:.1%}); same answer {f['same_answer_text']:.1%}; "
                         f"scorer agreement {f['scorer_agreement']:.1%}; {score}")
        lines.append(f"    acceptance: {acceptance(f['passes'])}")
    return lines


def row_record(r: GenRowResult | UndRowResult, baseline: float) -> dict[str, Any]:
    overall = overall_score(r.summary)
    record = {
        "config": None if r.spec.config is None else r.spec.config.to_dict(),
        "compiled": r.spec.compiled,
        "correct": r.correct,
        "summary": r.summary,
        "overall": overall.accuracy,
        "overall_ci95": overall.interval,
        "relative_drop_pct": relative_drop(overall.accuracy, baseline),
        f"seconds_per_{UNITS[r.spec.task]}": r.seconds_per_item,
        "seconds": r.seconds,
        "warmup_seconds": r.warmup_seconds,
    }
    if isinstance(r, GenRowResult):
        record.update(batch_sizes=r.batch_sizes, decisions=r.decisions, miss_causes=r.miss_causes)
    else:
        record.update(answers=r.answers, kept_positions=r.kept_positions, skipped=r.skipped)
    return record


def write_grid(results: list[GenRowResult], prompts: list[world.GenPrompt], path: Path, title: str) -> Path | None:
    """rows = methods, columns = the first ``GRID_COLUMNS`` prompts, "ok" / "wrong" under each image; None (and a
    note) without matplotlib."""
    from harness.grids import captioned_grid

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no grid PNG (pip install -e '.[plots]')")
        return None
    n = min(GRID_COLUMNS, len(prompts))
    rows = [(r.spec.name, list(r.images[:n])) for r in results]
    notes = [["ok" if ok else "wrong" for ok in r.correct[:n]] for r in results]
    return captioned_grid(rows, [p.caption for p in prompts[:n]], path, title=title, notes=notes)


def task_report(task: str, results: dict[str, GenRowResult | UndRowResult], items: list[dict]) -> dict[str, Any]:
    """Print the task's table and fidelity lines; the task's part of quality.json."""
    ordered = list(results.values())
    base = overall_score(results[BASELINE].summary).accuracy
    what = "prompts" if task == "gen" else "questions"
    print(f"\n{'generation' if task == 'gen' else 'understanding'}: {len(items)} held-out {what}")
    print(row_table(task, ordered))
    misses = miss_table(ordered) if task == "gen" else None
    if misses:
        print("how the layout prompts miss (prompts):")
        print(misses)
    fid = twin_fidelity(task, results)
    if fid:
        print("fidelity (compiled vs eager twin):")
        for line in fidelity_lines(task, fid):
            print("  " + line)
    return {what: items, "rows": {name: row_record(r, base) for name, r in results.items()}, "fidelity": fid}
