"""Charts of bench reports (matplotlib, the ``[plots]`` extra): what a reader would rather see than a table."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_bench_chart(report: dict[str, Any], path: Path) -> Path:
    """Horizontal bars, one per row: the row's median seconds, its speedup over the baseline, and where the
    device's measured rates put its floor (``harness.floors``; a tick mark, when known). A bare Figure, no pyplot
    global state."""
    from matplotlib.figure import Figure

    rows = report["rows"]
    names = [r["name"] for r in rows][::-1]  # the baseline on top
    seconds = [r["seconds"] for r in rows][::-1]
    fig = Figure(figsize=(9.0, 1.2 + 0.45 * len(rows)))
    ax = fig.add_subplot()
    bars = ax.barh(names, seconds, color=["#9aa5b1" if n == report["baseline"] else "#2f7ed8" for n in names])
    for bar, row in zip(bars, rows[::-1], strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f"  {row['seconds']:.3f} s, {row['speedup']:.2f}x",
                va="center", fontsize=8)
        if row.get("floor_s") is not None:
            ax.plot([row["floor_s"]] * 2, [bar.get_y(), bar.get_y() + bar.get_height()], color="#d62728", lw=2)
    if any(r.get("floor_s") is not None for r in rows):
        ax.plot([], [], color="#d62728", lw=2, label="floor at the measured matmul rate / copy bandwidth")
        ax.legend(loc="lower right", frameon=False, fontsize=8)
    ax.set_xlim(0, max(seconds) * 1.35)
    ax.set_xlabel(f"seconds per {'image' if report['task'] == 'gen' else 'request'} (median)")
    ax.set_title(f"{report['task']} {report['preset']} {report['dtype']} on {report['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    return path
