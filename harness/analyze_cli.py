"""``python -m harness analyze``: how specialised the FFN neurons of the two tasks are (paper Fig. 1).

    python -m harness analyze --gen calib/gen --und calib/und --out runs/analyze

Per layer: of each task's top-50% neurons (by calibration score), how many are generation-only,
understanding-only or shared. Writes ``specialization.json`` and, with matplotlib (the ``[plots]`` extra),
a stacked bar chart ``specialization.png``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flashu_fx.calibration import Calibration, specialization
from harness.arguments import command_parser

PARTS = (("gen_only", "generation only", "tab:orange"), ("und_only", "understanding only", "tab:blue"))
PARTS += (("both", "both", "tab:green"),)


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("python -m harness analyze", __doc__)
    p.add_argument("--gen", required=True, help="generation calibration path stem (as written by calibrate)")
    p.add_argument("--und", required=True, help="understanding calibration path stem")
    p.add_argument("--top-fraction", type=float, default=0.5, help="share of each task's highest-scored neurons")
    p.add_argument("--out", default="runs/analyze", help="output directory")
    return p


def format_table(report: dict[str, Any]) -> str:
    k = report["top_k"]
    lines = [
        f"top {report['top_fraction']:.0%} = {k} of {report['intermediate_size']} neurons per layer and task",
        f"{'layer':>5} {'gen-only':>9} {'und-only':>9} {'both':>7} {'neither':>8} {'shared':>7}",
    ]
    for row in [*report["layers"], {"layer": "all", **report["totals"]}]:
        scale = k if row["layer"] != "all" else k * len(report["layers"])
        lines.append(
            f"{row['layer']:>5} {row['gen_only']:>9} {row['und_only']:>9} {row['both']:>7} {row['neither']:>8} "
            f"{row['both'] / scale:>7.1%}"
        )
    return "\n".join(lines)


def save_chart(report: dict[str, Any], path: Path) -> None:
    """Stacked bars per layer: gen-only, und-only, both. Uses a bare Figure (no pyplot global state)."""
    from matplotlib.figure import Figure

    layers = [row["layer"] for row in report["layers"]]
    fig = Figure(figsize=(max(7.0, 2.5 + 0.3 * len(layers)), 4.0))
    ax = fig.add_subplot()
    bottom = [0] * len(layers)
    for key, label, color in PARTS:
        values = [row[key] for row in report["layers"]]
        ax.bar(layers, values, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xticks(layers)
    ax.set_xlabel("LLM layer")
    ax.set_ylabel(f"neurons in a task's top {report['top_fraction']:.0%}")
    ax.set_title("FFN neuron specialisation: generation vs understanding")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    gen, und = Calibration.load(args.gen), Calibration.load(args.und)
    for name, calib, want in (("--gen", gen, "gen"), ("--und", und, "und")):
        if calib.task != want:
            print(f"warning: {name} {getattr(args, name[2:])} is a {calib.task!r} calibration")
    report = specialization(gen, und, args.top_fraction)
    print(f"gen: {gen.method}, {gen.samples_used} samples; und: {und.method}, {und.samples_used} samples")
    print(format_table(report))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "specialization.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'specialization.json'}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no chart (pip install -e '.[plots]')")
        return 0
    save_chart(report, out / "specialization.png")
    print(f"wrote {out / 'specialization.png'}")
    return 0
