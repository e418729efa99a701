"""lm-evaluation-harness on an HF export, offline (``stagecraft eval HF_DIR --tasks ...``).

The harness's own HF backend (``lm_eval.models.huggingface.HFLM``) loads the export with
transformers, so what is scored is exactly what a stage wrote. Nothing is downloaded:
``HF_DATASETS_OFFLINE`` and ``HF_HUB_OFFLINE`` are set before datasets or lm-eval is imported (they
read them at import), the model loads with ``local_files_only``, and every task's data must be local:
a task YAML whose ``dataset_path: json`` (or csv, parquet) and ``dataset_kwargs.data_files`` name
files on disk by absolute path (docs/evaluation.md shows MMLU, GSM8K, ARC, C-Eval that way).

Task lookup: the task YAMLs under ``include_path`` directories, plus the project's own
``stagecraft_synthetic_mc`` (generated on demand, trainer/evaluation/tasks.py). lm-eval's built-in
index of several thousand YAMLs is only scanned when a requested name is not found there first, which
saves most of the start-up time of a local-only evaluation.

lm-eval is an optional dependency (``pip install 'stagecraft[eval]'``); without it this refuses with
that install line rather than failing on an import deep inside.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from trainer.evaluation import tasks as own_tasks
from trainer.runtime.errors import BadInput

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _require_lm_eval():
    os.environ.update(OFFLINE)
    try:
        import lm_eval
    except ImportError:
        raise BadInput("--tasks: lm-evaluation-harness is not installed; pip install 'stagecraft[eval]' "
                       "(lm-eval 0.4.x)") from None
    return lm_eval


def task_manager(task_names: list[str], include_paths: list[Path]):
    """A TaskManager that knows ``task_names``: the include paths alone when they define them all,
    else with lm-eval's built-in tasks too. BadInput names the tasks found nowhere."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_paths]
    for defaults in (False, True):
        manager = TaskManager(include_path=paths or None, include_defaults=defaults)
        missing = [t for t in task_names if t not in manager.all_tasks]
        if not missing:
            return manager
    raise BadInput(f"--tasks: {', '.join(missing)} not found in lm-eval's tasks or in --include-path "
                   f"{', '.join(paths) or '(none)'}; a local task is a YAML with `task: NAME` (docs/evaluation.md)")


def default_output(hf_dir: Path) -> Path:
    """``<stage>/eval/lm_eval.json`` for a stage's ``hf/`` export, else ``<hf_dir>-eval/lm_eval.json``:
    never inside the model directory, whose files a later stage fingerprints (trainer/runtime/identity.py)."""
    hf_dir = Path(hf_dir).resolve()
    if hf_dir.name == "hf":
        return hf_dir.parent / "eval" / "lm_eval.json"
    return hf_dir.with_name(hf_dir.name + "-eval") / "lm_eval.json"


def run_lm_eval(hf_dir: str | Path, task_names: list[str], include_path: list[str | Path] | None = None,
                limit: int | None = None, out: str | Path | None = None, batch_size: int = 8,
                device: str = "cpu", apply_chat_template: bool = False, num_fewshot: int | None = None) -> dict:
    """Evaluate ``hf_dir`` on ``task_names``; writes and returns ``{"model", "tasks", "limit",
    "results": {task: {metric: value}}, "versions", "n-samples", "config"}``.

    ``apply_chat_template``: render each prompt as a user turn of the tokenizer's chat template with
    the generation prompt (the form a chat-tuned stage was trained on); the choice then follows the
    assistant header directly."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise BadInput(f"{hf_dir}: not a Hugging Face model directory (no config.json)")
    lm_eval = _require_lm_eval()
    from lm_eval.utils import handle_non_serializable

    includes = [Path(p) for p in include_path or []]
    for path in includes:
        if not path.is_dir():
            raise BadInput(f"--include-path: {path} is not a directory")
    with tempfile.TemporaryDirectory(prefix="stagecraft-tasks-") as scratch:
        if own_tasks.TASK in task_names:
            own_tasks.write_task(scratch)
            includes.append(Path(scratch))
        manager = task_manager(task_names, includes)
        results = lm_eval.simple_evaluate(
            model="hf", tasks=task_names, task_manager=manager, limit=limit, batch_size=batch_size, device=device,
            model_args={"pretrained": str(hf_dir), "dtype": "float32", "local_files_only": True},
            apply_chat_template=apply_chat_template, num_fewshot=num_fewshot, log_samples=False,
            bootstrap_iters=0)  # no stderr bootstrap: it costs minutes on a CPU and is not reported here
    report = {"model": str(hf_dir), "tasks": task_names, "limit": limit, "apply_chat_template": apply_chat_template,
              "results": results["results"], "versions": results.get("versions", {}),
              "n-samples": results.get("n-samples", {}),
              "config": {k: results.get("config", {}).get(k) for k in ("batch_size", "device", "model_dtype")}}
    out = Path(out) if out is not None else default_output(hf_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=handle_non_serializable))
    os.replace(tmp, out)
    report["path"] = str(out)
    return report
