"""Where this node's workers meet the others: node count, node rank and the rendezvous endpoint.

With ``cluster.launcher=local`` they come from the config: start the same command on every node with
``cluster.nnodes=N cluster.node_rank=<r> cluster.master_addr=<node 0> cluster.master_port=<port>``;
torchrun's static rendezvous numbers the ranks node by node, so global rank 0 is on node 0.
With ``cluster.launcher=srun`` (one srun task per node, what the generated sbatch script runs) they
come from the scheduler: SLURM_NNODES, SLURM_NODEID, and the first host of SLURM_JOB_NODELIST, parsed
here (``node[01-03],gpu7``) rather than by calling ``scontrol show hostnames``, which a container
may not have. The port is then derived from the job id, so every node agrees on it without talking
and two jobs that share a node do not collide.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from omegaconf import DictConfig

from trainer.config.validate import ConfigError
from trainer.runtime.errors import BadInput
from trainer.runtime.signals import signal_numbers

LAUNCHERS = ("local", "slurm", "srun")
SLURM_PORT_BASE = 20000


@dataclass(frozen=True)
class Rendezvous:
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int


def _split_top(text: str) -> list[str]:
    """Split on the commas that are not inside brackets: ``a[1,3],b`` -> ``["a[1,3]", "b"]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_range(body: str) -> list[str]:
    """``01-03,7`` -> ``["01", "02", "03", "7"]`` (zero padding kept, as slurm does)."""
    out = []
    for item in body.split(","):
        lo, _, hi = item.partition("-")
        if not hi:
            out.append(lo)
            continue
        out += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list, expanded in order: ``node[01-02],gpu[1,3]-ib`` ->
    ``["node01", "node02", "gpu1-ib", "gpu3-ib"]``."""
    hosts = []
    for part in _split_top(nodelist.strip()):
        match = re.search(r"\[([^\]]*)\]", part)
        if match is None:
            hosts.append(part)
            continue
        head, tail = part[:match.start()], part[match.end():]
        for value in _expand_range(match.group(1)):
            hosts += expand_nodelist(head + value + tail)  # further brackets, e.g. rack[1-2]-n[1-4]
    return hosts


def _slurm_int(env: Mapping[str, str], *names: str) -> int:
    for name in names:
        if env.get(name, "").strip():
            try:
                return int(env[name].split("(")[0])  # SLURM_TASKS_PER_NODE style "2(x3)"
            except ValueError:
                raise BadInput(f"cluster.launcher=srun: {name}={env[name]!r} is not a number") from None
    raise BadInput(f"cluster.launcher=srun: {names[0]} is not set. cluster.launcher=srun runs inside a "
                   "slurm allocation, one srun task per node (`srun --ntasks-per-node=1 stagecraft ...`); "
                   "`stagecraft ... cluster=slurm` writes and submits such a job")


def from_slurm(cluster: DictConfig, env: Mapping[str, str]) -> Rendezvous:
    """This srun task's place in the job, from the scheduler's environment."""
    nnodes = _slurm_int(env, "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    node_rank = _slurm_int(env, "SLURM_NODEID")
    tasks = env.get("SLURM_NTASKS") or env.get("SLURM_STEP_NUM_TASKS")
    if tasks and int(tasks) != nnodes:
        raise BadInput(f"cluster.launcher=srun: this step runs {tasks} tasks on {nnodes} nodes; it needs one task "
                       "per node (srun --ntasks-per-node=1), which starts torchrun for that node's "
                       "cluster.nproc_per_node workers")
    if cluster.nnodes not in (1, nnodes):
        raise BadInput(f"cluster.nnodes: {cluster.nnodes}, but the slurm allocation has SLURM_NNODES={nnodes}")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise BadInput("cluster.launcher=srun: SLURM_JOB_NODELIST is not set; it names the rendezvous host")
    port = cluster.master_port or SLURM_PORT_BASE + _slurm_int(env, "SLURM_JOB_ID") % 10000
    return Rendezvous(nnodes, node_rank, expand_nodelist(nodelist)[0], port)


def resolve(cfg: DictConfig, env: Mapping[str, str]) -> Rendezvous:
    """This node's rendezvous, also written back into ``cfg.cluster`` so that validation, the workers'
    overrides and the saved config.yaml all state the layout that really runs."""
    c = cfg.cluster
    if c.launcher == "srun":
        rdzv = from_slurm(c, env)
    else:
        rdzv = Rendezvous(c.nnodes, c.node_rank, c.master_addr, c.master_port)
    c.nnodes, c.node_rank, c.master_addr, c.master_port = (rdzv.nnodes, rdzv.node_rank, rdzv.master_addr,
                                                           rdzv.master_port)
    return rdzv


def rendezvous_overrides(rdzv: Rendezvous) -> list[str]:
    """What the workers of this node are told (they do not read the scheduler's environment)."""
    return [f"cluster.nnodes={rdzv.nnodes}", f"cluster.node_rank={rdzv.node_rank}",
            f"cluster.master_addr={rdzv.master_addr}", f"cluster.master_port={rdzv.master_port}"]


def parse_signal(spec: str) -> tuple[str, int]:
    """``USR1@300`` -> ``("SIGUSR1", 300)``; a bad spec raises ConfigError naming cluster.signal."""
    name, _, seconds = spec.rpartition("@")
    name = name.split(":")[-1]  # "B:USR1" (only the batch shell) is accepted, as sbatch does
    if not name or not seconds.isdigit() or int(seconds) <= 0:
        raise ConfigError(f"cluster.signal: must be SIGNAL@SECONDS, e.g. USR1@300; got {spec!r}")
    try:
        signal_numbers([name])
    except ValueError:
        raise ConfigError(f"cluster.signal: unknown signal {name!r} in {spec!r}") from None
    return (name if name.startswith("SIG") else f"SIG{name}"), int(seconds)


def validate_cluster(cfg: DictConfig) -> None:
    """The cluster.* rules, each error naming its key (the rest of the config: trainer.config.validate)."""
    c = cfg.cluster
    if c.launcher not in LAUNCHERS:
        raise ConfigError(f"cluster.launcher: must be one of {', '.join(LAUNCHERS)}; got {c.launcher!r}")
    if not 0 <= c.node_rank < max(c.nnodes, 1):
        raise ConfigError(f"cluster.node_rank: must be in [0, cluster.nnodes={c.nnodes}); got {c.node_rank}")
    if c.launcher == "local" and c.nnodes > 1 and c.master_port == 0:
        raise ConfigError(f"cluster.master_port: a run on cluster.nnodes={c.nnodes} nodes needs a fixed port, the same "
                          "on every node (e.g. cluster.master_port=29500); 0 would pick a different one on each")
    if c.launcher == "slurm":
        name, _ = parse_signal(c.signal)
        stops = [s if s.startswith("SIG") else f"SIG{s}" for s in cfg.run.stop_signals]
        if name not in stops:
            raise ConfigError(f"cluster.signal: {name} is not in run.stop_signals {list(cfg.run.stop_signals)}: the "
                              "run would be killed by it instead of checkpointing and requeueing")
        for key in ("sbatch_lines", "srun_args"):
            for line in c[key]:
                if "\n" in line:
                    raise ConfigError(f"cluster.{key}: one option per entry, no newlines; got {line!r}")
