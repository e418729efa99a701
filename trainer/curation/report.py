"""A curation tool's outputs: kept records, report.json, report.md and PNG plots, each written atomically.

Order matters for a reader polling the directory (a recipe stage, a person): the kept records and the
plots are written first and `report.json` last, each through a temporary file and `os.replace`, so a
`report.json` that exists describes complete outputs beside it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from trainer.data.synthetic import write_jsonl

KEPT_FILE = "kept.jsonl"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` through `path.tmp` and `os.replace`: a reader sees the old file or the new one whole.

    (Not trainer.checkpoint's copy: importing that package loads megatron-core, seconds per CLI call.)"""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_kept(output_dir: Path, records: list[dict]) -> Path:
    path = output_dir / KEPT_FILE
    write_jsonl(path, records)
    return path


def _table(rows: Sequence[tuple[str, object]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]


def write_report(output_dir: Path, report: dict, lines: Sequence[str], plots: Sequence[str]) -> None:
    """report.md (the common counts, the tool's own `lines`, the plots), then report.json."""
    head = [("inputs", ", ".join(f"`{p}`" for p in report["inputs"])), ("records read", report["records"]),
            ("bad records skipped", report["bad_records"])]
    if report.get("output"):
        head += [("kept", report["kept"]), ("output", f"`{report['output']}`")]
    md = [f"# stagecraft data {report['tool']}", "", report["summary"], "", *_table(head), "", *lines, ""]
    md += [f"![{p}]({p})" for p in plots]
    write_text_atomic(output_dir / REPORT_MD, "\n".join(md) + "\n")
    write_text_atomic(output_dir / REPORT_JSON, json.dumps(report, indent=2, ensure_ascii=False) + "\n")


def quantiles(values: Sequence[float]) -> dict:
    """min / p50 / p90 / p99 / max / mean (nearest-rank percentiles) of `values`; {} when empty."""
    if not values:
        return {}
    ordered = sorted(values)

    def rank(q: float):
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {"min": ordered[0], "p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": ordered[-1],
            "mean": sum(ordered) / len(ordered)}


def histogram(values: Sequence[float], bins: int) -> dict:
    """{"edges": [bins + 1], "counts": [bins]} over [min, max]; the last bin includes max."""
    import numpy as np

    if not values:
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(np.asarray(values, dtype=float), bins=bins)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on a cluster node)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> None:
    """Save a figure atomically and close it."""
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    pyplot().close(fig)
    tmp.replace(path)


def plot_histogram(path: Path, series: dict[str, Sequence[float]], xlabel: str, lines: dict[str, float] | None = None,
                   log_x: bool = False) -> None:
    """Overlaid histograms (one per named series) with optional vertical marker lines."""
    import numpy as np

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    values = [v for s in series.values() for v in s]
    if values:
        lo, hi = min(values), max(values)
        if log_x and lo > 0:
            edges = np.geomspace(lo, hi if hi > lo else lo * 2, 31)
            ax.set_xscale("log")
        else:
            edges = np.linspace(lo, hi if hi > lo else lo + 1, 31)
        for name, s in series.items():
            ax.hist(list(s), bins=edges, alpha=0.55, label=f"{name} ({len(s)})")
    for name, x in (lines or {}).items():
        ax.axvline(x, color="k", linestyle="--", linewidth=1, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("records")
    ax.legend(fontsize=7)
    save(fig, path)
