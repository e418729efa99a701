"""Where a stage's numbers go: metrics.jsonl, wandb (offline unless asked), and a console progress bar.

Only rank 0 logs. wandb is imported lazily and runs in offline mode by default with its files inside
the stage directory, so nothing reaches the network unless ``logging.wandb_mode=online``. Every stage
of a run is one wandb run named after the stage, in one group per run directory (:func:`wandb_group`),
with the resolved config, and at its end the stage's loss plot and metrics.jsonl as an artifact;
:func:`log_report` adds the recipe report's plots to the same group. At the end of a stage rank 0
prints a one-screen summary (trainer/logging/console.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, after_step: int) -> None:
    """Drop records of steps after ``after_step`` (a resumed run recomputes them)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= after_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


class MetricsLogger:
    def __init__(self, stage_dir: Path, cfg: DictConfig, stage_name: str, total_steps: int, start_step: int,
                 enabled: bool):
        self.enabled = enabled
        self.path = Path(stage_dir) / "metrics.jsonl"
        self.wandb_run = None
        self.bar = None
        self.log_every = cfg.logging.log_every
        if not enabled:
            return
        truncate_metrics(self.path, start_step)
        self._file = open(self.path, "a")
        self._stage_dir = Path(stage_dir)
        self._records: list[dict] = []  # this run's records, for the end-of-stage summary
        self._started = time.perf_counter()
        if cfg.logging.wandb_mode != "disabled":
            import wandb

            wandb_dir = Path(stage_dir) / "wandb"
            wandb_dir.mkdir(parents=True, exist_ok=True)
            group = wandb_group(cfg)
            # The id is stable per run directory and stage, so a resumed stage continues its own wandb run.
            self.wandb_run = wandb.init(
                project=cfg.logging.project, entity=cfg.logging.entity, group=group, name=stage_name,
                job_type=str(cfg.stage.type), dir=str(wandb_dir), mode=cfg.logging.wandb_mode, resume="allow",
                id=f"{group}-{_slug(stage_name)}", config=OmegaConf.to_container(cfg, resolve=True),
                settings=wandb.Settings(silent=True))
        if cfg.logging.progress:
            # tqdm's own fields give the ETA (elapsed<remaining) and steps/s; the postfix adds the rest.
            self.bar = tqdm(total=total_steps, initial=start_step, desc=stage_name, dynamic_ncols=True)
        self._t_last = time.perf_counter()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(dumps(record) + "\n")
        self._file.flush()
        self._records.append(record)
        if self.wandb_run is not None:
            self.wandb_run.log(record, step=step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            shown = {k: v for k, v in record.items() if k in ("loss", "lr") or k.endswith("_per_s")}
            # Only a training step's record: the end-of-stage eval record would blank the postfix.
            if step % self.log_every == 0 and "loss" in shown:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items() if isinstance(v, (int, float))},
                                     refresh=True)

    def close(self, result: dict | None = None) -> None:
        """Close the bar, the file and the wandb run; with the stage's ``result``, print its summary
        and attach its loss plot to wandb."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self._file.close()
        if result is not None:
            from trainer.logging.console import print_stage_summary

            print_stage_summary(result, self._records, self._started)
        if self.wandb_run is not None:
            if result is not None:
                self.wandb_run.summary.update({k: _plain(v) for k, v in result.items()
                                               if isinstance(_plain(v), (int, float, str))})
                _log_files(self.wandb_run, f"{_slug(self.wandb_run.name)}-plots",
                           [_loss_plot(self._stage_dir, self._records), self.path])
            self.wandb_run.finish()


def wandb_group(cfg: DictConfig) -> str:
    """``<run.name>-<8 hex digits of the absolute run.dir>``: one group per run directory, so the
    stages of one run (and its resumptions) are together, and two runs that share a name are not."""
    digest = hashlib.sha256(str(Path(cfg.run.dir).resolve()).encode()).hexdigest()[:8]
    return f"{_slug(cfg.run.name)[:40]}-{digest}"


def _loss_plot(stage_dir: Path, records: list[dict]) -> Path:
    """The stage's training-loss curve, the panel the recipe report draws for it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if isinstance(r.get("loss"), (int, float))]
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    fig.tight_layout()
    path = Path(stage_dir) / "loss_curve.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _log_files(run, name: str, paths: list[Path]) -> None:
    """``paths`` (those that exist) as one artifact of type "plots", images also as wandb Images."""
    import wandb

    artifact = wandb.Artifact(name, type="plots")
    for path in paths:
        if Path(path).is_file():
            artifact.add_file(str(path))
            if str(path).endswith(".png"):
                run.log({f"plots/{Path(path).stem}": wandb.Image(str(path))})
    run.log_artifact(artifact)


def log_report(run_dir: Path, cfg: DictConfig, plots: list[str]) -> None:
    """The recipe report's plots, report.md and summary.json as an artifact of a "report" run in the
    run's wandb group (rank 0, after trainer.logging.report.write_report)."""
    if cfg.logging.wandb_mode == "disabled":
        return
    import wandb

    run_dir = Path(run_dir)
    wandb_dir = run_dir / "wandb"
    wandb_dir.mkdir(parents=True, exist_ok=True)
    group = wandb_group(cfg)
    run = wandb.init(project=cfg.logging.project, entity=cfg.logging.entity, group=group, name="report",
                     job_type="report", dir=str(wandb_dir), mode=cfg.logging.wandb_mode, resume="allow",
                     id=f"{group}-report", config=OmegaConf.to_container(cfg, resolve=True),
                     settings=wandb.Settings(silent=True))
    _log_files(run, "report-plots", [run_dir / p for p in plots] + [run_dir / "report.md", run_dir / "summary.json"])
    run.finish()


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by its name ("nan", "inf", "-inf"): strict JSON,
    which Python's own encoder is not (it writes bare NaN, which other readers reject)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return _plain(value)


def dumps(value: Any, **kwargs) -> str:
    """Strict JSON text of ``value`` (see :func:`json_safe`)."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def _plain(value: Any) -> Any:
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)
