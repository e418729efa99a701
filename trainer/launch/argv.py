"""The command-line arguments that compose this job's config again, in another process.

The ``stagecraft`` command re-executes itself: under torchrun (every worker composes the config
itself), under srun on each node of a slurm job, and once per point of a sweep. Each of those
processes must see exactly what the user gave: not only the overrides (``recipe=mine``) but where
configs are looked up (``--config-dir``, ``--config-path``, ``hydra.searchpath=...``) and which primary
config is used (``--config-name``); without them a worker fails with ``Could not find 'recipe/mine'``.

``sys.argv`` is not that list: in a sweep it holds the sweep syntax (``-m lr=1e-3,3e-3``) rather than
this point's value, and under a Hydra launcher plugin it is the plugin's own command line. Hydra
records what composed this job — the config sources with their absolute paths, the primary config's
name, and the overrides of this one job — so the arguments are rebuilt from that record.
"""

from __future__ import annotations

from pathlib import Path

# Hydra adds these itself for the job at hand; another process in RUN mode must not inherit them.
_HYDRA_OWN = ("hydra.mode=",)


def _source_url(source) -> str:
    return source.path if source.schema == "file" else f"{source.schema}://{source.path}"


def hydra_argv() -> list[str]:
    """``[--config-path P] [--config-dir D] [--config-name N] <hydra.* overrides> <overrides>`` of the
    running Hydra job: what composes the same config in a fresh ``python -m trainer.cli``."""
    from hydra.core.hydra_config import HydraConfig

    from trainer.config import CONFIG_DIR

    hydra = HydraConfig.get()
    args: list[str] = []
    for source in hydra.runtime.config_sources:
        if source.provider == "main" and not (source.schema == "file"
                                               and Path(source.path).resolve() == Path(CONFIG_DIR).resolve()):
            args += ["--config-path", _source_url(source)]
        elif source.provider == "command-line":  # --config-dir, already made absolute by Hydra
            args += ["--config-dir", _source_url(source)]
    if hydra.job.config_name and hydra.job.config_name != "config":
        args += ["--config-name", hydra.job.config_name]
    args += [o for o in hydra.overrides.hydra if not o.startswith(_HYDRA_OWN)]
    return args + list(hydra.overrides.task)
