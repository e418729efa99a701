"""Where a stage's numbers go: metrics.jsonl, wandb (offline unless asked), and a console progress bar.

Only rank 0 logs. wandb is imported lazily and runs in offline mode by default with its files inside
the stage directory, so nothing reaches the network unless ``logging.wandb_mode=online``.
"""

from __future__ import annotations

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
        if cfg.logging.wandb_mode != "disabled":
            import wandb

            wandb_dir = Path(stage_dir) / "wandb"
            wandb_dir.mkdir(parents=True, exist_ok=True)
            self.wandb_run = wandb.init(
                project=cfg.logging.project, entity=cfg.logging.entity, name=f"{cfg.run.name}/{stage_name}",
                dir=str(wandb_dir), mode=cfg.logging.wandb_mode, resume="allow",
                id=f"{_slug(cfg.run.name)}-{_slug(stage_name)}",
                config=OmegaConf.to_container(cfg, resolve=True), settings=wandb.Settings(silent=True))
        if cfg.logging.progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc=stage_name, dynamic_ncols=True)
        self._t_last = time.perf_counter()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(dumps(record) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(record, step=step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if step % self.log_every == 0:
                shown = {k: record[k] for k in ("loss", "lr", "tokens_per_s") if k in record}
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


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
