"""The report at the end of a recipe: summary.json, report.md (a table stage by stage, and every
claim the recipe makes checked against the measured numbers), and PNG plots."""

from __future__ import annotations

from pathlib import Path

from trainer.checkpoint import write_text_atomic
from trainer.logging.metrics import dumps, read_metrics


def check_claims(summary: dict, claims: list[dict]) -> list[dict]:
    """Each claim with the two measured values and whether it holds; a missing metric never holds."""
    evals = {"base": summary["base"]["eval"], **{s["name"]: s["eval"] for s in summary["stages"]}}
    checked = []
    for claim in claims:
        value = evals.get(claim["stage"], {}).get(claim["metric"])
        threshold = claim.get("threshold")
        baseline = threshold if threshold is not None else evals.get(claim["baseline"], {}).get(claim["metric"])
        if value is None or baseline is None:
            holds = False
        elif claim["expect"] == "higher":
            holds = value > baseline
        else:
            holds = abs(value - baseline) <= claim["tolerance"]
        checked.append({**claim, "value": value, "baseline_value": baseline, "holds": holds})
    return checked


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def _table(summary: dict) -> list[str]:
    rows = [("base", "—", summary["base"]["eval"], {})] + [
        (s["name"], s["type"], s["eval"], s["result"]) for s in summary["stages"]]
    metrics = sorted({k for _, _, e, _ in rows for k in e if k.endswith(("accuracy", "response_tokens", "length_score"))})
    lines = ["| stage | type | " + " | ".join(metrics) + " | steps |",
             "|" + "---|" * (len(metrics) + 3)]
    for name, kind, evals, result in rows:
        lines.append(f"| {name} | {kind} | " + " | ".join(_fmt(evals.get(m)) for m in metrics)
                     + f" | {result.get('steps', '—')} |")
    return lines


def _plots(run_dir: Path, summary: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    stages = summary["stages"]
    trained = [s for s in stages if (run_dir / "stages" / s["name"] / "metrics.jsonl").is_file()]
    fig, axes = plt.subplots(1, len(trained), figsize=(3.2 * len(trained), 2.8), squeeze=False)
    for ax, stage in zip(axes[0], trained):
        records = [r for r in read_metrics(run_dir / "stages" / stage["name"] / "metrics.jsonl") if "loss" in r]
        ax.plot([r["step"] for r in records], [r["loss"] for r in records])
        ax.set_title(stage["name"], fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    axes[0][0].set_ylabel("training loss", fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "loss_curves.png", dpi=110)
    plt.close(fig)
    written.append("loss_curves.png")

    names = ["base"] + [s["name"] for s in stages]
    evals = [summary["base"]["eval"]] + [s["eval"] for s in stages]
    metrics = sorted({k for e in evals for k in e if k.endswith("/accuracy") or k.endswith("preference_accuracy")})
    if metrics:
        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 3.2))
        width = 0.8 / len(metrics)
        for i, metric in enumerate(metrics):
            ax.bar([x + i * width for x in range(len(names))], [e.get(metric, 0.0) for e in evals], width,
                   label=metric)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names, fontsize=8)
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(run_dir / "accuracy.png", dpi=110)
        plt.close(fig)
        written.append("accuracy.png")
    return written


def write_report(run_dir: Path, summary: dict, claims: list[dict]) -> dict:
    run_dir = Path(run_dir)
    summary = {**summary, "claims": check_claims(summary, claims)}
    write_text_atomic(run_dir / "summary.json", dumps(summary, indent=2))  # before plotting can fail
    plots = _plots(run_dir, summary)
    lines = [f"# Recipe `{summary['recipe']}`", "", "Held-out evaluation of each stage's exported model "
             "(greedy-generation accuracy per task family; preference ranking accuracy on held-out pairs).", "",
             *_table(summary), "", "## Claims", ""]
    for c in summary["claims"]:
        verdict = "holds" if c["holds"] else "DOES NOT HOLD"
        relation = "vs" if c["expect"] == "higher" else f"within {c['tolerance']} of"
        against = (f"chance level {_fmt(c['threshold'])}" if c.get("threshold") is not None
                   else f"{c['baseline']} = {_fmt(c['baseline_value'])}")
        lines.append(f"- {c['description']}: {c['metric']} after {c['stage']} = {_fmt(c['value'])} {relation} "
                     f"{against} — **{verdict}**")
    lines += ["", "## Data mixes", ""]
    lines += [f"- {s['name']}: " + ", ".join(f"{k} {v:.1%}" for k, v in s["data_mix"].items()) for s in summary["stages"]]
    lines += [""] + [f"![{p}]({p})" for p in plots]
    write_text_atomic(run_dir / "report.md", "\n".join(lines) + "\n")
    return {**summary, "plots": plots}  # the plots: for trainer.logging.metrics.log_report
