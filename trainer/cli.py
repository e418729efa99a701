"""The ``stagecraft`` command: compose the Hydra config, validate it, launch the workers, run the stage.

``stagecraft parallel=zero2 cluster.nproc_per_node=2`` re-executes itself under torchrun with 2
workers; under torchrun (or with one process) each worker builds the Topology and runs the stage.
``cluster.nnodes`` > 1: the same command on every node, each with its ``cluster.node_rank``;
``cluster=slurm``: an sbatch job whose every node runs this command again (docs/launch.md).

Everything that can be checked without a worker is checked here, once, before any worker starts: the
config, the layout against the process count, model and tokenizer paths, the run.dir lock (node 0's
launcher holds it for the whole job). Every re-executed process gets the user's own arguments,
config directories included (trainer/launch/argv.py). The launcher forwards stop signals to torchrun
(which forwards them to the workers), and torchrun dies with the launcher, so no worker is ever left
behind. The process exits with the code of the error the run ended with (trainer/runtime/errors.py;
docs/fault-tolerance.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from trainer.config import CONFIG_DIR, ConfigError, register_configs, validate
from trainer.config.paths import check_paths
from trainer.launch.torchrun import NODE_EXIT_ENV, free_port, launch, torchrun_command  # noqa: F401  (re-exported)
from trainer.runtime.errors import CollectiveTimeout, RunError, exit_code_for
from trainer.runtime.lock import HELD_ENV, RunLock

log = logging.getLogger("stagecraft")
EXIT_FILE = "exit.json"  # <run.dir>/exit.json: how the last run on this directory ended (rank 0 writes it)
# Read once, when the process starts: a one-process run sets LOCAL_RANK itself (DeepSpeed wants one), and
# the next point of a sweep in this same process must still know it is the launcher.
UNDER_LAUNCHER = "LOCAL_RANK" in os.environ


def run_worker(cfg: DictConfig) -> dict:
    """One worker's whole job: process groups, the run.dir lock (rank 0), the check that every rank
    sees the same run.dir, then the stage or recipe."""
    from trainer.logging import console
    from trainer.parallel import Topology
    from trainer.runtime.shared_fs import check_shared_run_dir
    from trainer.stages import get_stage
    from trainer.stages.common import from_main

    topology = Topology.initialize(cfg.parallel)
    console.setup(topology.is_main)  # each warning once, one line on accelerators (trainer/logging/console.py)
    if not topology.is_main:  # one copy of the progress log, from rank 0; warnings from every rank
        logging.getLogger().setLevel(logging.WARNING)
    lock = RunLock(Path(cfg.run.dir))
    try:
        refusal = None
        if topology.is_main and HELD_ENV not in os.environ:  # one process, or a user's own torchrun
            try:
                lock.acquire()
                (Path(cfg.run.dir) / EXIT_FILE).unlink(missing_ok=True)  # it describes the last run only
            except RunError as err:
                refusal = _locked_out(err)
        refusal = from_main(refusal, topology)
        if refusal is not None:
            raise refusal
        check_shared_run_dir(Path(cfg.run.dir), topology.rank, topology.world_size)
        validate(cfg, topology.world_size)
        if cfg.recipe is not None:
            from trainer.recipe import run_recipe

            return run_recipe(cfg, topology)
        return get_stage(cfg.stage.type)(cfg, topology)
    finally:
        lock.release()
        topology.destroy()


def _locked_out(err: RunError) -> RunError:
    """Mark a refusal by another job's run.dir lock: its exit.json is that job's, not ours to write
    (its batch script reads it when it ends)."""
    err.locked_out = True
    return err


def _is_timeout(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("timed out" in text or "timeout" in text)


def _where(err: BaseException) -> str:
    """The collective and the project code that called it, from the traceback."""
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if "/trainer/" in f.filename]
    op = next((f.name for f in reversed(frames) if "torch/distributed" in f.filename and not f.name.startswith("_")
               and f.name != "wrapper"), "a collective")
    caller = f" called from {Path(ours[-1].filename).name}:{ours[-1].lineno} ({ours[-1].name})" if ours else ""
    return f"{op}{caller}"


def _ended(cfg: DictConfig, err: BaseException) -> int:
    """Report how the run ended (once, from rank 0, for errors every rank shares) and return the code."""
    rank = int(os.environ.get("RANK", 0))
    if _is_timeout(err):
        err = CollectiveTimeout(f"rank {rank}: {_where(err)} timed out after {cfg.parallel.timeout_minutes} min "
                                f"(parallel.timeout_minutes); another rank hung or died. {str(err).splitlines()[0]}")
    code = exit_code_for(err)
    # On stderr, where a shell user and a scheduler's error file look (the progress log is on stdout).
    if code == 1:
        print(f"stagecraft: rank {rank} failed:\n{''.join(traceback.format_exception(err))}", file=sys.stderr)
    elif rank == 0 or isinstance(err, CollectiveTimeout):
        print(f"stagecraft: error: {err}", file=sys.stderr)
    record = json.dumps({"code": code, "error": type(err).__name__, "message": str(err)})
    targets = []
    if (rank == 0 or isinstance(err, CollectiveTimeout)) and not getattr(err, "locked_out", False):
        out = Path(cfg.run.dir)
        if out.is_dir():  # a config refused before anything ran leaves no directory behind
            targets.append(out / EXIT_FILE)
    if NODE_EXIT_ENV in os.environ and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        targets.append(Path(os.environ[NODE_EXIT_ENV]))  # for this node's launcher (node_rank > 0)
    for path in targets:
        try:
            path.write_text(record)
        except OSError:
            pass
    return code


def _exit_code_from_workers(cfg: DictConfig, torchrun_code: int, node_file: Path) -> int:
    """torchrun says only that a worker failed. Rank 0 left the code and message in exit.json; on
    another node, this node's first worker left its own in ``node_file``."""
    paths = [Path(cfg.run.dir) / EXIT_FILE, node_file] if cfg.cluster.node_rank == 0 else [node_file]
    for path in paths:
        try:
            ended = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        print(f"stagecraft: run ended with exit code {ended['code']}: {ended['message'].splitlines()[0]}",
              file=sys.stderr)
        return int(ended["code"]) or torchrun_code
    return torchrun_code


def _require_model_path(cfg: DictConfig) -> None:
    """``model=hf`` names no model of its own: its ``path: ???`` merges onto the schema's null, so
    without this check the embedded tiny model would quietly be trained instead."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.get().runtime.choices.get("model") == "hf" and cfg.model.path is None:
        raise ConfigError("model.path: model=hf needs a local Hugging Face model directory "
                          "(model.path=/path/to/model)")


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def _launch_node(cfg: DictConfig, rdzv) -> None:
    """Start this node's torchrun and wait for it. Only node 0's launcher locks run.dir and clears
    exit.json: the nodes of one job share run.dir, and the job is one holder of it."""
    from trainer.launch.argv import hydra_argv
    from trainer.launch.multinode import rendezvous_overrides

    lock = None
    if rdzv.node_rank == 0:
        try:
            lock = RunLock(Path(cfg.run.dir)).acquire()
        except RunError as err:
            raise SystemExit(_ended(cfg, _locked_out(err))) from None
        (Path(cfg.run.dir) / EXIT_FILE).unlink(missing_ok=True)
    if not rdzv.master_port:  # one node (validate_cluster): a free port, picked now so the workers are told it
        cfg.cluster.master_port = free_port()
        rdzv = dataclasses.replace(rdzv, master_port=cfg.cluster.master_port)
    overrides = [*hydra_argv(), f"run.dir={cfg.run.dir}", *rendezvous_overrides(rdzv)]
    command = torchrun_command(cfg, overrides)
    log.info("run.dir %s; node %d of %d; launching: %s", cfg.run.dir, rdzv.node_rank, rdzv.nnodes, " ".join(command))
    with tempfile.TemporaryDirectory(prefix="stagecraft-node-") as scratch:
        node_file = Path(scratch) / EXIT_FILE
        try:
            code = launch(cfg, command, str(node_file))
        finally:
            if lock is not None:
                lock.release()
        if code:
            raise SystemExit(_exit_code_from_workers(cfg, code, node_file))


def _main(cfg: DictConfig) -> None:
    from trainer.launch import multinode

    under_launcher = UNDER_LAUNCHER
    try:
        # Resolved once here, so every worker, node and stage of a recipe agrees on it.
        cfg.run.dir = str(cfg.run.dir)
        rdzv = None
        if not under_launcher:
            multinode.validate_cluster(cfg)
            if cfg.cluster.launcher != "slurm":  # the submitting host is not part of the job
                rdzv = multinode.resolve(cfg, os.environ)
        world = cfg.cluster.nproc_per_node * cfg.cluster.nnodes
        validate(cfg, None if under_launcher else world)  # the layout against the process count, once
        _require_model_path(cfg)
        check_paths(cfg)
        if not under_launcher and _in_sweep():
            from trainer.launch import sweep
            from trainer.launch.argv import hydra_argv
            from trainer.launch.slurm import job_args
            from hydra.core.hydra_config import HydraConfig

            sweep.record(cfg, list(HydraConfig.get().overrides.task), job_args(hydra_argv(), Path(cfg.run.dir)))
            if cfg.cluster.launcher == "slurm":
                return  # submitted as one job array when the multirun returns (trainer.launch.sweep.finish)
        if not under_launcher and cfg.cluster.launcher == "slurm":
            from trainer.launch import slurm
            from trainer.launch.argv import hydra_argv

            try:
                RunLock(Path(cfg.run.dir)).acquire().release()  # refused now, not once the job starts
            except RunError as err:
                raise _locked_out(err) from None
            raise SystemExit(slurm.submit_run(cfg, hydra_argv()))
    except Exception as err:  # noqa: BLE001  (a bad config: its one-line message, its exit code)
        raise SystemExit(_ended(cfg, err)) from None
    if not under_launcher and world > 1:
        _launch_node(cfg, rdzv)
        return
    try:
        result = run_worker(cfg)
    except Exception as err:  # noqa: BLE001  (every failure ends in its documented exit code)
        raise SystemExit(_ended(cfg, err)) from None
    if int(os.environ.get("RANK", 0)) == 0:
        log.info("result: %s", OmegaConf.to_yaml(OmegaConf.create(result)))
        log.info("run.dir: %s", cfg.run.dir)


# ``stagecraft <name> ...``: tools with their own argparse front end (``--help`` lists their options);
# any other first argument is a Hydra override of a training run. Each module has ``main(argv) -> int``.
SUBCOMMANDS = {"data": "trainer.curation.cli", "plan": "trainer.launch.plan", "sweep": "trainer.launch.sweep",
               "export": "trainer.export.cli", "eval": "trainer.evaluation.cli"}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        import importlib

        raise SystemExit(importlib.import_module(SUBCOMMANDS[sys.argv[1]]).main(sys.argv[2:]))
    register_configs()
    from trainer.launch import sweep

    try:
        hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")(_main)()
    except BaseException:
        sweep.finish(submit=False)  # a failed sweep queues nothing; a local one's summary shows how far it got
        raise
    try:
        sweep.finish()  # after a multirun: submit a slurm sweep as a job array, or summarise a local one
    except Exception as err:  # noqa: BLE001
        print(f"stagecraft: error: {err}", file=sys.stderr)
        raise SystemExit(exit_code_for(err)) from None


if __name__ == "__main__":
    main()
