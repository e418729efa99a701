"""Every rank must see the same run.dir: checked once, right after the process groups exist.

Rank 0 alone writes the synthetic data, a recipe's data mixes, checkpoint markers and the renames that
publish a checkpoint; the other ranks read them back from run.dir. On nodes that do not share a
filesystem (run.dir on a node-local disk, or given differently to each node) those ranks would read
nothing or someone else's files, and fail much later with a confusing message, or resume from a stale
checkpoint. So rank 0 writes a file with a fresh random name into run.dir, every rank looks for it
(for a few seconds: an NFS client may cache the directory briefly), and the ranks gather what they saw.
If any rank does not see it, every rank stops with :class:`BadInput` (exit 2) naming run.dir, the
hosts and the paths involved.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from pathlib import Path

from trainer.runtime.errors import BadInput

log = logging.getLogger(__name__)
PROBE_PREFIX = ".shared-fs-"
WAIT_SECONDS = 5.0


def _sees(path: Path, nonce: str, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while True:
        try:
            if path.read_text() == nonce:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def check_shared_run_dir(run_dir: Path, rank: int, world_size: int, wait: float = WAIT_SECONDS) -> None:
    """Collective over the world (torch.distributed must be initialised): raise BadInput on every rank
    unless every rank reads the file rank 0 just wrote into ``run_dir``."""
    if world_size == 1:
        return
    import torch.distributed as dist

    run_dir = Path(run_dir)
    box = [None]
    if rank == 0:
        box[0] = secrets.token_hex(8)
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f"{PROBE_PREFIX}{box[0]}"
        with open(probe, "w") as f:
            f.write(box[0])
            f.flush()
            os.fsync(f.fileno())
    dist.broadcast_object_list(box, src=0)
    nonce = box[0]
    probe = run_dir / f"{PROBE_PREFIX}{nonce}"
    seen = rank == 0 or _sees(probe, nonce, wait)
    views: list = [None] * world_size
    dist.all_gather_object(views, (socket.gethostname(), str(run_dir.absolute()), seen))
    if rank == 0:
        probe.unlink(missing_ok=True)
    blind = [r for r, (_, _, ok) in enumerate(views) if not ok]
    if not blind:
        hosts = sorted({host for host, _, _ in views})
        if rank == 0:
            log.info("run.dir %s is shared by all %d ranks on %d host(s)", run_dir, world_size, len(hosts))
        return
    host0, dir0, _ = views[0]
    where = "; ".join(f"{_ranks([r for r in blind if views[r][:2] == (host, path)])} on {host} looked in {path}"
                      for host, path in dict.fromkeys(views[r][:2] for r in blind))
    raise BadInput(f"run.dir: not the same directory on every rank. Rank 0 on {host0} wrote {dir0}/"
                   f"{PROBE_PREFIX}{nonce}, and {where} but did not find it (waited {wait:g} s). Rank 0 writes the "
                   "data, data mixes and checkpoints there for every rank to read: put run.dir on a filesystem "
                   "that every node mounts at the same path, and give every node the same run.dir")
