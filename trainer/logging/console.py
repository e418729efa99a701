"""What a person reads on the console: each warning once, one line about missing accelerators, and a
one-screen summary at the end of every stage.

Why warnings repeated every step: Python shows a warning once per code location, remembered in each
module's ``__warningregistry__``, but every change to the warning filters silently empties those
registries, and every subprocess start changes them (``os.get_exec_path`` enters
``warnings.catch_warnings()``). DeepSpeed's ZeRO-3 on CPU starts ``numactl --hardware`` twice a step
(``__avg_scatter_grads`` asks the CPU accelerator for ``device_count()``, which runs it each time),
and calls ``reduce_scatter_tensor`` / ``all_gather_into_tensor``, which torch 2.13 deprecates with a
FutureWarning per call: so the same lines came back every step, hundreds of times in a 48-step run.
:func:`setup` therefore (1) drops those two deprecations, which name DeepSpeed's internals and ask
nothing of the user, and (2) shows any other warning once per process by its text, whatever happens
to the registries.

Missing optional accelerators: DeepSpeed logs "Setting accelerator to CPU ..." on import, megatron-core
warns about Transformer Engine and Apex, transformers about flash-attn; :func:`setup` silences those and
:func:`accelerator_line` says it once, in one line, from rank 0.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
import warnings

log = logging.getLogger("stagecraft")

# Deprecations raised inside libraries we call, on every step; nothing a user of stagecraft can change.
_IGNORED = [
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
    (UserWarning, r"Transformer Engine and Apex are not installed"),
]
OPTIONAL_KERNELS = ("transformer_engine", "apex", "flash_attn")
_installed = False


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with one of ``prefixes`` (said once by us instead)."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def _show_once(showwarning):
    seen: set[tuple[type, str]] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        key = (category, str(message))
        if key in seen:
            return
        seen.add(key)
        showwarning(message, category, filename, lineno, file, line)

    return show


def setup(is_main: bool = True) -> None:
    """Install the filters (once per process; a recipe calls stages many times) and, on rank 0,
    log the accelerator line."""
    global _installed
    if not _installed:
        _installed = True
        for category, pattern in _IGNORED:
            warnings.filterwarnings("ignore", message=pattern, category=category)
        warnings.showwarning = _show_once(warnings.showwarning)
        logging.getLogger("DeepSpeed").addFilter(_DropMessages("Setting accelerator to CPU"))
        # DeepSpeed compiles its shared-memory collective on CPU and logs each gcc command at INFO.
        logging.getLogger("compilers.C.base").setLevel(logging.WARNING)
        try:  # the "Writing model shards" bar of every export would interleave with the progress bar
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover - transformers is a dependency
            pass
    if is_main:
        log.info(accelerator_line())


def accelerator_line() -> str:
    """One line: the device the run computes on, and which optional kernel packages are missing."""
    import torch

    device = f"CUDA ({torch.cuda.device_count()} GPU)" if torch.cuda.is_available() else "CPU (no CUDA device)"
    missing = [name for name in OPTIONAL_KERNELS if importlib.util.find_spec(name) is None]
    kernels = (f"not installed: {', '.join(missing)} (plain-torch kernels are used instead)" if missing
               else "Transformer Engine, Apex and flash-attn installed")
    return f"accelerators: {device}; {kernels}"


def _fmt(value, spec: str = ".4f") -> str:
    return "—" if not isinstance(value, (int, float)) else format(value, spec)


def stage_summary(result: dict, records: list[dict], seconds: float) -> str:
    """The end-of-stage summary: steps, wall time, throughput, final and eval loss, where the export is.

    ``records`` are the stage's metrics.jsonl records of this run; throughput is the median of the
    per-step values (the first steps, which include warm-up, do not dominate it)."""
    steps = [r for r in records if "loss" in r]
    throughput_key = next((k for k in (steps[-1] if steps else {}) if k.endswith("_per_s")), None)
    rates = sorted(r[throughput_key] for r in steps if isinstance(r.get(throughput_key), (int, float)))
    median = rates[len(rates) // 2] if rates else None
    final = steps[-1] if steps else {}
    # The headline held-out numbers: losses and overall accuracies (per-family ones stay in COMPLETE.json).
    evals = {k: v for k, v in result.items() if k.startswith("eval_") and "/" not in k
             and ("loss" in k or k.endswith("accuracy")) and isinstance(v, (int, float))}
    unit = (throughput_key or "tokens_per_s")[:-len("_per_s")].replace("_", " ")
    rows = [("steps", f"{result.get('steps', '—')}   ({len(steps)} this run, wall time {seconds:.1f} s)"),
            ("throughput", f"{_fmt(median, '.1f')} {unit}/s (median over steps)"),
            ("final loss", f"{_fmt(final.get('loss'))} (step {final.get('step', '—')})"),
            *([(k.replace("_", " "), _fmt(v)) for k, v in sorted(evals.items())] or [("eval loss", "—")]),
            ("export", result.get("hf", "— (checkpoint.export_hf=false)"))]
    title = f" stage {result.get('stage', '?')} ({result.get('type', '?')}) complete "
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{title:=^72}", *(f"{label:<{width}}{text}" for label, text in rows)]
    return "\n".join(lines + ["=" * 72])


def print_stage_summary(result: dict, records: list[dict], started: float) -> None:
    """Print :func:`stage_summary` on stdout (rank 0 only calls this)."""
    print(stage_summary(result, records, time.perf_counter() - started), file=sys.stdout, flush=True)
