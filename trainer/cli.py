"""The ``stagecraft`` command: compose the Hydra config, validate it, launch the workers, run the stage.

``stagecraft parallel=zero2 cluster.nproc_per_node=2`` re-executes itself under torchrun with 2
workers; under torchrun (or with one process) each worker builds the Topology and runs the stage.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from trainer.config import CONFIG_DIR, register_configs, validate

log = logging.getLogger("stagecraft")


def torchrun_command(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """The torchrun command that runs this same job with ``cluster.nproc_per_node`` workers."""
    c = cfg.cluster
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={c.nproc_per_node}",
            f"--nnodes={c.nnodes}", f"--node_rank={c.node_rank}", f"--master_addr={c.master_addr}",
            f"--master_port={c.master_port}", "-m", "trainer.cli", *overrides,
            # Only the launching process keeps Hydra's copy of the composed config.
            "hydra.output_subdir=null"]


def run_worker(cfg: DictConfig) -> dict:
    """One worker's whole job: process groups, then the stage."""
    from trainer.parallel import Topology
    from trainer.stages import get_stage

    topology = Topology.initialize(cfg.parallel)
    if not topology.is_main:  # one copy of the progress log, from rank 0; warnings from every rank
        logging.getLogger().setLevel(logging.WARNING)
    try:
        validate(cfg, topology.world_size)
        if cfg.recipe is not None:
            from trainer.recipe import run_recipe

            return run_recipe(cfg, topology)
        return get_stage(cfg.stage.type)(cfg, topology)
    finally:
        topology.destroy()


def _main(cfg: DictConfig) -> None:
    validate(cfg)
    under_launcher = "LOCAL_RANK" in os.environ
    if not under_launcher and cfg.cluster.nproc_per_node * cfg.cluster.nnodes > 1:
        import subprocess

        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
        command = torchrun_command(cfg, overrides)
        log.info("launching: %s", " ".join(command))
        code = subprocess.call(command)
        if code:
            raise SystemExit(code)
        return
    result = run_worker(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        log.info("result: %s", OmegaConf.to_yaml(OmegaConf.create(result)))


def main() -> None:
    register_configs()
    hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")(_main)()


if __name__ == "__main__":
    main()
