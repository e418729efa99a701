"""One job per run.dir: an exclusive lock held for the whole run.

Two jobs on one run.dir would interleave checkpoints and metrics and crash each other. The lock is
``fcntl.flock`` on ``<run.dir>/.lock`` (released by the kernel when its holder dies, however it dies),
and the file records who holds it, so a refusal can say which job to wait for. A lock file whose holder
is gone is simply taken over, with a warning naming the old holder.

The ``stagecraft`` launcher takes the lock before it starts any worker and tells its workers so
through ``STAGECRAFT_RUN_LOCKED``; a job started by the user's own torchrun takes it on rank 0.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

from trainer.runtime.errors import Refused

log = logging.getLogger(__name__)
HELD_ENV = "STAGECRAFT_RUN_LOCKED"


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise Refused(f"run.dir {self.path.parent} is in use by {holder}. Wait for that job, stop it, "
                          "or give this one another run.dir") from None
        previous = os.pread(fd, 4096, 0)
        if previous.strip():
            log.warning("run.dir %s: taking over the lock of %s, which no longer runs", self.path.parent,
                        _describe(previous))
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an empty file: nobody to warn about next time
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(raw: bytes) -> str:
    try:
        holder = json.loads(raw)
        return f"pid {holder['pid']} on {holder['host']} (since {holder['since']})"
    except (ValueError, KeyError, TypeError):
        return "another job"
