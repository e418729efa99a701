"""The ``stagecraft`` command: compose the Hydra config, validate it, launch the workers, run the stage.

``stagecraft parallel=zero2 cluster.nproc_per_node=2`` re-executes itself under torchrun with 2
workers; under torchrun (or with one process) each worker builds the Topology and runs the stage.

Everything that can be checked without a worker is checked here, once, before any worker starts: the
config, the layout against the process count, model and tokenizer paths, the run.dir lock. The
launcher forwards stop signals to torchrun (which forwards them to the workers), and torchrun dies
with the launcher, so no worker is ever left behind. The process exits with the code of the error the
run ended with (trainer/runtime/errors.py; docs/fault-tolerance.md).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from trainer.config import CONFIG_DIR, ConfigError, register_configs, validate
from trainer.config.paths import check_paths
from trainer.runtime.errors import CollectiveTimeout, RunError, exit_code_for
from trainer.runtime.lock import HELD_ENV, RunLock
from trainer.runtime.signals import signal_numbers

log = logging.getLogger("stagecraft")
EXIT_FILE = "exit.json"  # <run.dir>/exit.json: how the last run on this directory ended (rank 0 writes it)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """The torchrun command that runs this same job with ``cluster.nproc_per_node`` workers."""
    c = cfg.cluster
    port = c.master_port or free_port()
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={c.nproc_per_node}",
            f"--nnodes={c.nnodes}", f"--node_rank={c.node_rank}", f"--master_addr={c.master_addr}",
            f"--master_port={port}", f"--shutdown_timeout={c.shutdown_timeout}", "-m", "trainer.cli", *overrides,
            # Only the launching process keeps Hydra's copy of the composed config.
            "hydra.output_subdir=null"]


def _die_with_parent() -> None:
    """In the torchrun child: SIGTERM when the launcher dies, however it dies (Linux prctl)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def launch(cfg: DictConfig, command: list[str]) -> int:
    """Run torchrun; forward stop signals (and Ctrl-C) to it as SIGTERM: torchrun passes SIGTERM on
    to every worker and waits ``cluster.shutdown_timeout`` seconds for their checkpoint."""
    proc = subprocess.Popen(command, preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                            env={**os.environ, HELD_ENV: "1"})

    def forward(signum, frame):
        log.warning("received %s: asking the workers to checkpoint and stop", signal.Signals(signum).name)
        proc.send_signal(signal.SIGTERM)

    for number in {*signal_numbers(cfg.run.stop_signals), signal.SIGINT}:
        signal.signal(number, forward)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:  # only if SIGINT arrived before the handler was set
            proc.send_signal(signal.SIGTERM)


def run_worker(cfg: DictConfig) -> dict:
    """One worker's whole job: process groups, the run.dir lock (rank 0), then the stage or recipe."""
    from trainer.parallel import Topology
    from trainer.stages import get_stage
    from trainer.stages.common import from_main

    topology = Topology.initialize(cfg.parallel)
    if not topology.is_main:  # one copy of the progress log, from rank 0; warnings from every rank
        logging.getLogger().setLevel(logging.WARNING)
    lock = RunLock(Path(cfg.run.dir))
    try:
        refusal = None
        if topology.is_main and HELD_ENV not in os.environ:  # a user's own torchrun: rank 0 locks
            try:
                lock.acquire()
            except RunError as err:
                refusal = err
        refusal = from_main(refusal, topology)
        if refusal is not None:
            raise refusal
        validate(cfg, topology.world_size)
        if cfg.recipe is not None:
            from trainer.recipe import run_recipe

            return run_recipe(cfg, topology)
        return get_stage(cfg.stage.type)(cfg, topology)
    finally:
        lock.release()
        topology.destroy()


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
    if rank == 0 or isinstance(err, CollectiveTimeout):
        out = Path(cfg.run.dir)
        if out.is_dir():  # a config refused before anything ran leaves no directory behind
            try:
                (out / EXIT_FILE).write_text(json.dumps({"code": code, "error": type(err).__name__,
                                                         "message": str(err)}))
            except OSError:
                pass
    return code


def _exit_code_from_workers(cfg: DictConfig, torchrun_code: int) -> int:
    """torchrun says only that a worker failed; rank 0 left the code and message in exit.json."""
    path = Path(cfg.run.dir) / EXIT_FILE
    try:
        ended = json.loads(path.read_text())
    except (OSError, ValueError):
        return torchrun_code
    print(f"stagecraft: run ended with exit code {ended['code']}: {ended['message'].splitlines()[0]}",
          file=sys.stderr)
    return int(ended["code"]) or torchrun_code


def _require_model_path(cfg: DictConfig) -> None:
    """``model=hf`` names no model of its own: its ``path: ???`` merges onto the schema's null, so
    without this check the embedded tiny model would quietly be trained instead."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.get().runtime.choices.get("model") == "hf" and cfg.model.path is None:
        raise ConfigError("model.path: model=hf needs a local Hugging Face model directory "
                          "(model.path=/path/to/model)")


def _main(cfg: DictConfig) -> None:
    under_launcher = "LOCAL_RANK" in os.environ
    world = cfg.cluster.nproc_per_node * cfg.cluster.nnodes
    try:
        # Resolved once here, so every worker and every stage of a recipe agrees on it.
        cfg.run.dir = str(cfg.run.dir)
        validate(cfg, None if under_launcher else world)  # the layout against the process count, once
        _require_model_path(cfg)
        check_paths(cfg)
    except Exception as err:  # noqa: BLE001  (a bad config: its one-line message, its exit code)
        raise SystemExit(_ended(cfg, err)) from None
    if not under_launcher and world > 1:
        from hydra.core.hydra_config import HydraConfig

        (Path(cfg.run.dir) / EXIT_FILE).unlink(missing_ok=True)
        try:
            lock = RunLock(Path(cfg.run.dir)).acquire()
        except RunError as err:
            raise SystemExit(_ended(cfg, err)) from None
        overrides = [*HydraConfig.get().overrides.task, f"run.dir={cfg.run.dir}"]
        command = torchrun_command(cfg, overrides)
        log.info("run.dir %s; launching: %s", cfg.run.dir, " ".join(command))
        try:
            code = launch(cfg, command)
        finally:
            lock.release()
        if code:
            raise SystemExit(_exit_code_from_workers(cfg, code))
        return
    try:
        result = run_worker(cfg)
    except Exception as err:  # noqa: BLE001  (every failure ends in its documented exit code)
        raise SystemExit(_ended(cfg, err)) from None
    if int(os.environ.get("RANK", 0)) == 0:
        log.info("result: %s", OmegaConf.to_yaml(OmegaConf.create(result)))
        log.info("run.dir: %s", cfg.run.dir)


def main() -> None:
    register_configs()
    hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")(_main)()


if __name__ == "__main__":
    main()
