"""Sweeps (``stagecraft -m a=1,2 b=x,y``): one run.dir per point, a slurm job array, a summary table.

Hydra's multirun calls the ``stagecraft`` job function once per point, in this process. Each call
records its point here (its overrides and its resolved run.dir: ``runs/<run.name>-<run_id>``, where
run_id hashes the result-relevant config, so points that train differently get different
directories; points that would share one are refused). With ``cluster.launcher=local`` each point
then runs; with ``cluster.launcher=slurm`` nothing runs yet, and when the multirun returns,
:func:`finish` submits every point as one job array: task i of ``<sweep dir>/slurm/job.sbatch`` runs
point i, with the same requeue-on-75 wrapper as a single job (trainer/launch/slurm.py).

The sweep directory is ``<common parent of the run.dirs>/sweep-<8 hex digits of the run.dirs>``, so the
same sweep command finds its own again. It holds ``sweep.json`` (the points) and ``summary.md``: a
markdown table, overrides that differ between points -> exit code and final metrics, read from each
run.dir (``exit.json``, ``summary.json`` of a recipe, ``stages/*/COMPLETE.json``, the last training loss
in ``metrics.jsonl``). Each array task rewrites it when its run ends; ``stagecraft sweep <dir>``
prints it at any time.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from trainer.runtime.errors import BadInput

MANIFEST = "sweep.json"
SUMMARY = "summary.md"


@dataclass
class Point:
    overrides: list[str]  # this point's Hydra overrides
    run_dir: str  # absolute
    args: list[str]  # the stagecraft arguments that run it (slurm)


# The points of the multirun in progress, and the config of the first (a slurm array is one job, so
# its options are the same for every point). Module state, because Hydra calls the job function once
# per point and only then returns to :func:`trainer.cli.main`.
_points: list[Point] = []
_first: dict = {}


def record(cfg: DictConfig, overrides: list[str], args: list[str]) -> Point:
    """Add this point; refuse one whose run.dir an earlier point already has, or (slurm) whose
    cluster.* settings differ from the first point's."""
    run_dir = str(Path(cfg.run.dir).absolute())
    for i, other in enumerate(_points):
        if other.run_dir == run_dir:
            mine, theirs = ([o for o in a if o not in b] for a, b in ((overrides, other.overrides),
                                                                      (other.overrides, overrides)))
            raise BadInput(f"run.dir: sweep points {i} ({' '.join(theirs)}) and {len(_points)} "
                           f"({' '.join(mine)}) both resolve to {run_dir}; run_id ignores keys that cannot change "
                           "results (cluster.*, logging.*, checkpoint.*, the layout), so set run.name per point, "
                           "e.g. 'run.name=n${cluster.nnodes}'")
    cluster = OmegaConf.to_container(cfg.cluster, resolve=True)
    if not _points:
        _first.update(cfg=OmegaConf.to_container(cfg, resolve=True), cluster=cluster)
    elif cfg.cluster.launcher == "slurm" and cluster != _first["cluster"]:
        keys = sorted(k for k in cluster if cluster[k] != _first["cluster"].get(k))
        raise BadInput(f"cluster.{keys[0]}: the points of a slurm sweep run as one job array, so cluster.* must be "
                       f"the same for every point; point {len(_points)} differs in "
                       + ", ".join(f"cluster.{k}" for k in keys))
    point = Point(list(overrides), run_dir, list(args))
    _points.append(point)
    return point


def sweep_dir(points: list[Point]) -> Path:
    from trainer.runtime.identity import digest

    dirs = sorted(p.run_dir for p in points)
    return Path(os.path.commonpath([str(Path(d).parent) for d in dirs])) / f"sweep-{digest(dirs)[:8]}"


def varying(points: list[Point]) -> list[str]:
    """The override keys whose value is not the same at every point, in the order first seen."""
    given = [dict(o.partition("=")[::2] for o in p.overrides) for p in points]
    keys = dict.fromkeys(k for g in given for k in g)
    return [k for k in keys if len({g.get(k) for g in given}) > 1]


def write_manifest(directory: Path, points: list[Point], job_id: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path, tmp = directory / MANIFEST, directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"varying": varying(points), "job_id": job_id,
                               "points": [asdict(p) for p in points]}, indent=1))
    tmp.replace(path)  # array tasks may be reading it already
    return path


def finish(submit: bool = True) -> None:
    """After Hydra's multirun: submit a slurm sweep as one job array, or summarise a local one.
    ``submit=False`` (the multirun failed): a slurm sweep queues nothing, a local one is summarised."""
    if not _points:
        return
    points, first = list(_points), dict(_first)
    _points.clear()
    _first.clear()
    directory = sweep_dir(points)
    cfg = OmegaConf.create(first["cfg"])
    if cfg.cluster.launcher != "slurm":
        write_manifest(directory, points)
        print(write_summary(directory))
        return
    if not submit:
        return
    from trainer.launch import slurm

    output = cfg.cluster.output or str(directory / "slurm" / "%A_%a.out")
    if not cfg.cluster.job_name:
        cfg.cluster.job_name = directory.name
    runs = [slurm.JobRun(p.args, Path(p.run_dir)) for p in points]
    script = slurm.write_script(directory / "slurm" / slurm.SCRIPT, slurm.render(cfg, runs, output, directory))
    if cfg.cluster.dry_run:
        write_manifest(directory, points)
        print(script.read_text(), end="")
        return
    slurm.prepare_output(output)
    write_manifest(directory, points)  # before the job starts: its tasks rewrite the summary from it
    job = slurm.submit(script)
    write_manifest(directory, points, job)
    print(f"stagecraft: submitted slurm job array {job} ({len(points)} points); script {script}; "
          f"summary: stagecraft sweep {directory}")


def _numbers(record: dict, prefix: str = "") -> dict:
    return {f"{prefix}{k}": v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "steps"}


def final_metrics(run_dir: Path) -> dict:
    """The last stage's final train loss and its eval metrics (a recipe: its summary.json's last stage)."""
    summary = run_dir / "summary.json"
    stages = sorted((run_dir / "stages").glob("*/COMPLETE.json"), key=lambda p: p.stat().st_mtime)
    metrics: dict = {}
    if stages:
        last = stages[-1].parent
        lines = (last / "metrics.jsonl").read_text().splitlines() if (last / "metrics.jsonl").is_file() else []
        losses = [r["loss"] for r in map(json.loads, lines) if "loss" in r]
        if losses:
            metrics["loss"] = losses[-1]
        metrics.update(_numbers(json.loads(stages[-1].read_text())))
    if summary.is_file():
        last = json.loads(summary.read_text())["stages"][-1]
        metrics.update(_numbers(last.get("eval") or {}))
    return metrics


def outcome(run_dir: Path) -> str:
    """``0``, the exit code rank 0 recorded, or ``not finished``."""
    ended = run_dir / "exit.json"
    if ended.is_file():
        try:
            record = json.loads(ended.read_text())
            return f"{record['code']} ({record.get('error', '?')})"
        except (ValueError, KeyError):
            return "? (unreadable exit.json)"
    done = (run_dir / "summary.json").is_file() or any((run_dir / "stages").glob("*/COMPLETE.json"))
    return "0" if done else "not finished"


def _cell(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def summary_table(directory: Path) -> str:
    """The markdown table of the sweep in ``directory`` (its sweep.json)."""
    manifest = json.loads((Path(directory) / MANIFEST).read_text())
    keys = manifest["varying"]
    rows = []
    for point in manifest["points"]:
        given = dict(o.partition("=")[::2] for o in point["overrides"])
        run_dir = Path(point["run_dir"])
        rows.append(([given.get(k, "") for k in keys], outcome(run_dir), final_metrics(run_dir), run_dir))
    metric_names = list(dict.fromkeys(name for _, _, metrics, _ in rows for name in metrics))
    head = ["#", *keys, "exit", *metric_names, "run.dir"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, (values, code, metrics, run_dir) in enumerate(rows):
        cells = [str(i), *values, code, *[_cell(metrics[m]) if m in metrics else "" for m in metric_names],
                 str(run_dir)]
        lines.append("| " + " | ".join(cells) + " |")
    return f"# Sweep {Path(directory).name}\n\n" + "\n".join(lines) + "\n"


def write_summary(directory: Path) -> str:
    """Rewrite ``summary.md`` (under a lock: array tasks that end together each rewrite it, and the
    last writer must have read every result written before it)."""
    directory = Path(directory)
    with open(directory / ".summary.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = summary_table(directory)
        tmp = directory / f".{SUMMARY}.tmp"
        tmp.write_text(text)
        tmp.replace(directory / SUMMARY)
    return text


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="stagecraft sweep",
                                     description="Print (and rewrite summary.md of) a sweep: overrides -> exit code "
                                                 "and final metrics of each point.")
    parser.add_argument("directory", type=Path, help="the sweep directory (holds sweep.json)")
    args = parser.parse_args(argv)
    if not (args.directory / MANIFEST).is_file():
        print(f"stagecraft sweep: {args.directory} has no {MANIFEST}", flush=True)
        return 2
    print(write_summary(args.directory), end="")
    return 0
