"""``cluster.launcher=slurm``: write an sbatch script for the run (or a sweep's job array) and submit it.

The script asks for ``cluster.nnodes`` nodes with one task each and starts one srun step; each task
runs the same ``stagecraft`` command with the same arguments plus ``cluster.launcher=srun``, which
takes its node rank and the rendezvous host from the scheduler (trainer/launch/multinode.py) and
starts torchrun for that node's ``cluster.nproc_per_node`` workers.

Preemption: ``--signal=<cluster.signal>`` reaches every task before the time limit; the workers stop at
a step boundary with a checkpoint and rank 0 writes ``exit.json`` with code 75. The batch shell then
reads that code (srun reports only the highest task code, and a launcher on another node may know
less) and, on 75, calls ``scontrol requeue $SLURM_JOB_ID``; the requeued job runs the same command,
which resumes. A preemption's SIGTERM also reaches the batch shell: it is trapped, so the shell keeps
waiting for srun instead of dying before it can requeue.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from trainer.runtime.errors import BadInput

SCRIPT = "job.sbatch"


@dataclass(frozen=True)
class JobRun:
    """One run of a job: the stagecraft arguments every node runs, and its (absolute) run.dir."""

    args: list[str]
    run_dir: Path


def node_command(cfg: DictConfig) -> str:
    """How each node starts stagecraft inside the job (a shell fragment)."""
    return cfg.cluster.command or shlex.join([sys.executable, "-m", "trainer.cli"])


def job_args(argv: list[str], run_dir: Path) -> list[str]:
    """The arguments of the in-job command: the user's, this run.dir made absolute (the job must not
    depend on the directory it starts in), and no second copy of Hydra's config record."""
    own = ("run.dir=", "cluster.dry_run=")  # replaced by the absolute run.dir; a dry run is never submitted
    return [*(a for a in argv if not a.startswith(own)), f"run.dir={Path(run_dir).absolute()}",
            "hydra.output_subdir=null"]


def sbatch_options(cfg: DictConfig, output: str, array: int | None = None) -> list[str]:
    """The ``#SBATCH`` lines, in the order sbatch documents them."""
    c = cfg.cluster
    lines = [f"--job-name={c.job_name or cfg.run.name}", f"--nodes={c.nnodes}", "--ntasks-per-node=1"]
    if cfg.parallel.device != "cpu":
        lines.append(f"--gpus-per-node={c.nproc_per_node}")
    if c.cpus_per_task:
        lines.append(f"--cpus-per-task={c.cpus_per_task}")
    lines.append(f"--time={c.time}")
    lines += [f"--{key}={c[key]}" for key in ("partition", "account") if c[key]]
    # append: a requeued job continues the same log file.
    lines += [f"--output={output}", "--open-mode=append", f"--signal={c.signal}",
              "--requeue" if c.requeue else "--no-requeue"]
    if array is not None:
        lines.append(f"--array=0-{array - 1}")
    lines += list(c.sbatch_lines)
    return [f"#SBATCH {line}" for line in lines]


def _run_lines(runs: list[JobRun]) -> list[str]:
    def assign(run: JobRun) -> str:
        return f"run_dir={shlex.quote(str(run.run_dir))}; args=({' '.join(map(shlex.quote, run.args))})"

    if len(runs) == 1:
        return assign(runs[0]).split("; ")
    lines = ['case "${SLURM_ARRAY_TASK_ID:-}" in']
    lines += [f"  {i}) {assign(run)} ;;" for i, run in enumerate(runs)]
    lines += ['  *) echo "stagecraft: no sweep point for SLURM_ARRAY_TASK_ID=${SLURM_ARRAY_TASK_ID:-}" >&2; exit 2 ;;',
              "esac"]
    return lines


def render(cfg: DictConfig, runs: list[JobRun], output: str, sweep_dir: Path | None = None) -> str:
    """The sbatch script: one run, or (several runs) a job array whose task i runs ``runs[i]``."""
    from trainer.launch.multinode import parse_signal

    c = cfg.cluster
    command = node_command(cfg)
    stop = parse_signal(c.signal)[0].removeprefix("SIG")
    srun = ["srun", f"--nodes={c.nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", *c.srun_args]
    lines = ["#!/bin/bash",
             "# Written by stagecraft (trainer/launch/slurm.py); docs/launch.md explains each part.",
             *sbatch_options(cfg, output, len(runs) if len(runs) > 1 else None),
             "", "# cluster.setup", *c.setup, "",
             *_run_lines(runs),
             'mkdir -p "$run_dir"',
             'rm -f "$run_dir/exit.json"  # from an earlier attempt: it must not decide about this one',
             "# The batch shell outlives signals: it must still read the exit code and requeue.",
             "got_signal=0",
             *(["trap 'got_signal=1' TERM"] if stop != "TERM" else []),
             # Reaches this shell only with --signal=B:...; srun passes it on to every task.
             f"trap 'got_signal=1; kill -s {stop} \"$pid\" 2>/dev/null' {stop}",
             f'{shlex.join(srun)} {command} "${{args[@]}}" cluster.launcher=srun &',
             "pid=$!",
             "code=127",
             "while :; do",
             "  got_signal=0",
             '  wait "$pid"; status=$?',
             '  [ "$status" -eq 127 ] || code=$status',
             '  [ "$got_signal" -eq 1 ] || break',
             "done",
             "# Rank 0's record of how the run ended wins over the codes srun collected.",
             'if [ -f "$run_dir/exit.json" ]; then',
             '  written=$(sed -n \'s/^{"code": *\\([0-9][0-9]*\\).*/\\1/p\' "$run_dir/exit.json")',
             '  [ -n "$written" ] && code=$written',
             "fi",
             'echo "stagecraft: job ${SLURM_JOB_ID:-?} ended with exit code $code"']
    if c.requeue:
        lines += ['if [ "$code" -eq 75 ]; then',
                  '  echo "stagecraft: preempted after a checkpoint; requeueing job $SLURM_JOB_ID"',
                  '  scontrol requeue "$SLURM_JOB_ID"',
                  "  exit 75",
                  "fi"]
    if sweep_dir is not None:
        lines.append(f"{command} sweep {shlex.quote(str(sweep_dir))} || true  # the sweep's summary.md, so far")
    lines.append('exit "$code"')
    return "\n".join(lines) + "\n"


def write_script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def prepare_output(output: str) -> None:
    """slurm does not create the log's directory: a job whose --output directory is missing runs
    and loses its log, so it is made here (when the path has no per-job pattern in its directory)."""
    parent = Path(output).parent
    if "%" not in str(parent):
        parent.mkdir(parents=True, exist_ok=True)


def submit(script: Path) -> str:
    """``sbatch --parsable <script>``; the job id."""
    try:
        proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        raise BadInput(f"cluster.launcher=slurm: sbatch is not on PATH. Submit from a slurm login node, or "
                       f"cluster.dry_run=true to only write and print {script}") from None
    if proc.returncode != 0:
        raise BadInput(f"cluster.*: sbatch refused {script} (exit {proc.returncode}): {proc.stderr.strip()} "
                       "(check cluster.partition, cluster.account, cluster.time, cluster.sbatch_lines)")
    return proc.stdout.strip().split(";")[0]


def submit_run(cfg: DictConfig, argv: list[str]) -> int:
    """``stagecraft ... cluster=slurm``: write ``<run.dir>/slurm/job.sbatch``; print it (dry run) or
    submit it and print the job id."""
    run_dir = Path(cfg.run.dir).absolute()
    output = cfg.cluster.output or str(run_dir / "slurm" / "%j.out")
    script = write_script(run_dir / "slurm" / SCRIPT, render(cfg, [JobRun(job_args(argv, run_dir), run_dir)], output))
    if cfg.cluster.dry_run:
        print(script.read_text(), end="")
        print(f"# cluster.dry_run=true: not submitted; written to {script}", file=sys.stderr)
        return 0
    prepare_output(output)
    job = submit(script)
    print(f"stagecraft: submitted slurm job {job} ({cfg.cluster.nnodes} node(s) x {cfg.cluster.nproc_per_node} "
          f"workers); script {script}; log {output.replace('%j', job)}; run.dir {run_dir}")
    return 0
