"""Starting this node's workers under torchrun, and stopping them cleanly.

The launcher forwards stop signals (and Ctrl-C) to torchrun as SIGTERM; torchrun passes them to every
worker and waits ``cluster.shutdown_timeout`` seconds for their checkpoint. torchrun is started with
a parent-death signal, so it dies with the launcher however the launcher dies, and it also handles the
run's own stop signals: a scheduler that signals every process of a job step (slurm's ``--signal``
does) would otherwise kill torchrun with SIGUSR1's default action before the workers checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys

from omegaconf import DictConfig

from trainer.runtime.lock import HELD_ENV
from trainer.runtime.signals import signal_numbers

log = logging.getLogger("stagecraft")
# Each node launcher gives its workers a node-local file for their exit code: torchrun reports 1 for any
# worker failure, and rank 0's <run.dir>/exit.json is written on node 0 only.
NODE_EXIT_ENV = "STAGECRAFT_NODE_EXIT_FILE"
# torchrun's own default (torch.distributed.elastic), to which the run's stop signals are added.
_TORCHRUN_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """The torchrun command that runs this same job with ``cluster.nproc_per_node`` workers on this
    node (``cluster.nnodes``, ``node_rank``, ``master_addr``, ``master_port``: the rendezvous)."""
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


def torchrun_env(cfg: DictConfig, exit_file: str | None) -> dict:
    names = [signal.Signals(n).name for n in signal_numbers(cfg.run.stop_signals)]
    env = {**os.environ, HELD_ENV: "1",
           "TORCHELASTIC_SIGNALS_TO_HANDLE": ",".join(dict.fromkeys([*_TORCHRUN_SIGNALS, *names]))}
    if exit_file:
        env[NODE_EXIT_ENV] = exit_file
    return env


def launch(cfg: DictConfig, command: list[str], exit_file: str | None = None) -> int:
    """Run torchrun until it exits; forward stop signals (and Ctrl-C) to it as SIGTERM."""
    proc = subprocess.Popen(command, preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                            env=torchrun_env(cfg, exit_file))

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
