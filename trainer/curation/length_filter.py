"""LongWriter's two-step length filter (Bai et al. 2024, §4): keep responses that honour the length asked.

Step 1 drops every record whose instruction asks for no length (`trainer.data.required_length` is
None): the filter can only judge a request it can read. Step 2 scores the response's length
(`trainer.data.produced_length`) against the requirement with S_l (`trainer.data.length_score`) and
keeps S_l >= ``threshold`` (default 80, LongWriter's cut).

What the threshold means as a ratio r = produced / required (solving S_l = t on each branch):
    r > 1:  100·(1 − (r − 1)/3) >= t   ⇔  r <= 1 + 3·(1 − t/100)        (t = 80: r <= 1.6)
    r <= 1: 100·(1 − (1/r − 1)/2) >= t ⇔  r >= 1 / (1 + 2·(1 − t/100))  (t = 80: r >= 1/1.4 ≈ 0.714)
so the default keeps responses between 71.4 % and 160 % of the asked length. A response exactly on a
boundary is kept: the comparison allows 1e-9 for float rounding, so r = 1.6 exactly is kept however
the division rounds.

The instruction is the last user turn before the response; the response is a chat's last assistant
turn, a row's ``response``, a preference pair's ``chosen`` side. Kept records are written unchanged.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from trainer.curation.common import (Drops, Inputs, Result, bad_option, excerpt, instruction, on_bad_record_option,
                                     option, response_text)
from trainer.curation.report import pyplot, save
from trainer.data.curation import length_score
from trainer.data.length import produced_length, required_length

NAME = "length-filter"
SUMMARY = "LongWriter length filter: keep responses whose length score S_l >= --threshold"
PLOT = "length_scatter.png"
_SLACK = 1e-9


@dataclass
class Options:
    threshold: float = option(80.0, "keep records with length score S_l >= this (0-100; LongWriter: 80)")
    examples: int = option(5, "dropped records quoted per step in the report")
    plot: bool = option(True, f"write {PLOT} (required vs produced length, before and after)")
    on_bad_record: str = on_bad_record_option()


def kinds(options: Options) -> tuple[str, ...]:
    return ("chat", "row", "preference")


def ratio_bounds(threshold: float) -> tuple[float, float]:
    """The produced/required ratios S_l >= threshold keeps (derivation: module docstring)."""
    slack = 1.0 - threshold / 100.0
    return 1.0 / (1.0 + 2.0 * slack), 1.0 + 3.0 * slack


def _summary(points: list[tuple[int, int, float]]) -> dict:
    if not points:
        return {"records": 0}
    return {"records": len(points), "mean_score": statistics.fmean(s for _, _, s in points),
            "median_ratio": statistics.median(p / r for r, p, _ in points)}


def _plot(path: Path, before: list[tuple[int, int, float]], after: list[tuple[int, int, float]],
          threshold: float) -> None:
    """Required vs produced, log-log, all scored records then the kept ones, with the S_l boundaries."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharex=True, sharey=True)
    everything = [v for r, p, _ in before for v in (r, max(p, 1))]
    lo, hi = (min(everything), max(everything)) if everything else (1, 10)
    low, high = ratio_bounds(threshold)
    for ax, points, title in ((axes[0], before, "before (with a requirement)"), (axes[1], after, "after")):
        dots = ax.scatter([r for r, _, _ in points], [max(p, 1) for _, p, _ in points], s=6, alpha=0.6,
                          c=[s for _, _, s in points], cmap="viridis", vmin=0, vmax=100)
        ax.plot([lo, hi], [lo, hi], "k-", linewidth=0.8, label="produced = required")
        ax.plot([lo, hi], [lo * high, hi * high], "r--", linewidth=0.8, label=f"S_l = {threshold:g} bounds")
        ax.plot([lo, hi], [lo * low, hi * low], "r--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{title}: {len(points)}", fontsize=9)
        ax.set_xlabel("required length")
    axes[0].set_ylabel("produced length")
    axes[0].legend(fontsize=7)
    fig.colorbar(dots, ax=axes[1], label="S_l")
    save(fig, path)


def run(inputs: Inputs, options: Options, output_dir: Path) -> Result:
    if not 0 <= options.threshold <= 100:
        raise bad_option(NAME, "threshold", f"must be in [0, 100], got {options.threshold}")
    drops = Drops(options.examples)
    kept, before, after = [], [], []
    for row in inputs.rows:
        asked = instruction(row.record)
        required = required_length(asked)
        if required is None:
            drops.add(row, "no_requirement", instruction=excerpt(asked))
            continue
        produced = produced_length(response_text(row.record))
        score = length_score(required, produced)
        before.append((required, produced, score))
        if score + _SLACK < options.threshold:
            drops.add(row, "below_threshold", instruction=excerpt(asked), required=required, produced=produced,
                      score=round(score, 3))
            continue
        after.append((required, produced, score))
        kept.append(row.record)
    steps = {"records": len(inputs.rows), "no_requirement": drops.counts.get("no_requirement", 0),
             "with_requirement": len(before), "below_threshold": drops.counts.get("below_threshold", 0),
             "kept": len(kept)}
    low, high = ratio_bounds(options.threshold)
    report = {"threshold": options.threshold, "kept_ratio_range": [low, high], "steps": steps,
              "before": _summary(before), "after": _summary(after), "examples": drops.examples}
    plots = []
    if options.plot:
        _plot(output_dir / PLOT, before, after, options.threshold)
        plots.append(PLOT)
    lines = ["## Steps", "", "| step | records |", "|---|---|",
             f"| read | {steps['records']} |", f"| 1. has a length requirement | {steps['with_requirement']} "
             f"({steps['no_requirement']} dropped) |",
             f"| 2. S_l >= {options.threshold:g} (ratio {low:.3f}-{high:.3f}) | {steps['kept']} "
             f"({steps['below_threshold']} dropped) |", ""]
    for name in ("before", "after"):
        s = report[name]
        if s["records"]:
            lines.append(f"- {name}: {s['records']} records, mean S_l {s['mean_score']:.1f}, "
                         f"median produced/required {s['median_ratio']:.3f}")
    for reason, examples in drops.examples.items():
        lines += ["", f"### Dropped: {reason}", ""]
        lines += [f"- `{e['where']}`: " + ", ".join(f"{k} {v}" for k, v in e.items() if k != "where")
                  for e in examples]
    summary = (f"{NAME}: {steps['records']} records, {steps['no_requirement']} without a length requirement, "
               f"{steps['below_threshold']} with S_l < {options.threshold:g}, {steps['kept']} kept")
    return Result(kept, report, summary, lines, plots)
