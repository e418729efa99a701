"""Sharded checkpoints that a torn write, a bad disk or a crash during pruning can never pass off as good.

Layout under ``<stage>/checkpoints/``::

    step_000006/            one complete checkpoint: strategy shards, rng_rank*.pt, manifest.json, COMPLETE
    step_000006.universal/  (deepspeed) the same checkpoint converted for another data-parallel size
    step_000009.partial/    being written, or torn by a crash: ignored and cleaned up
    latest                  text file naming the newest complete tag, replaced atomically

Writing: every rank writes its shards under ``<tag>.partial``; after a barrier the ranks checksum the
files between them and rank 0 writes ``manifest.json`` (every file's size and sha256), then the
``COMPLETE`` marker (step and layout), renames the directory to ``<tag>`` and replaces ``latest``. A
crash at any point leaves either the previous ``latest`` intact or a complete new one. A write that
fails on any rank (a full disk) fails on every rank, removes the partial directory and leaves the
previous checkpoint the latest.

Resuming: the newest checkpoint whose marker parses and whose files match its manifest is used; a
newer one that does not verify is named in a warning and skipped. Pruning removes an old checkpoint's
marker before its files, so a checkpoint half-deleted by a crash is never taken for a complete one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from trainer.parallel.topology import Topology
from trainer.runtime.errors import CheckpointWriteError, RunError

log = logging.getLogger(__name__)

_TAG = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"
MANIFEST = "manifest.json"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def derive_rng_state(seed: int, step: int, rank: int) -> None:
    """Seed every generator from (seed, step, rank): for a rank that did not exist when the checkpoint
    was written (a resume at a larger world size). Reproducible, though not the stream the old layout
    would have continued: nothing in the stage loops draws from these generators across steps (data
    order and NEFTune noise are functions of (seed, step)), so losses do not depend on it."""
    mixed = (seed * 1_000_003 + step * 9_176 + rank) % (2**32)
    random.seed(mixed)
    np.random.seed(mixed)
    torch.manual_seed(mixed)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(root: Path) -> list[str]:
    """Every regular file under ``root`` (relative, sorted), except the marker and the manifest."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and p.name not in (MARKER, MANIFEST))


def _gather(value, topology: Topology) -> list:
    if topology.world_size == 1:
        return [value]
    out = [None] * topology.world_size
    dist.all_gather_object(out, value)
    return out


def _agree_ok(error: str | None, topology: Topology) -> str | None:
    """Collective: the first rank's error message, or None when every rank succeeded."""
    errors = [e for e in _gather(error, topology) if e is not None]
    return errors[0] if errors else None


def _describe_write_error(err: BaseException, where: Path) -> str:
    """What went wrong writing ``where``, in words: a full disk says so (torch's C++ writer only says
    ``basic_ios::clear: iostream error``, so the free space is measured when the errno is lost)."""
    try:
        free = shutil.disk_usage(where if where.exists() else where.parent).free
    except OSError:
        free = None
    full = getattr(err, "errno", None) == errno.ENOSPC or (free is not None and free < 1 << 20)
    if full:
        shown = f"{free / 2**20:.1f} MiB free" if free is not None else "free space unknown"
        return f"no space left on device writing checkpoint {where} ({shown})"
    return f"could not write checkpoint {where}: {type(err).__name__}: {err}"


class CheckpointManager:
    def __init__(self, directory: Path, keep_last: int, topology: Topology, seed: int = 0):
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.topology = topology
        self.seed = seed

    @staticmethod
    def tag(step: int) -> str:
        return f"step_{step:06d}"

    def complete_tags(self) -> list[str]:
        """Checkpoints with a marker, oldest first (not yet verified)."""
        if not self.dir.is_dir():
            return []
        tags = [p.name for p in self.dir.iterdir() if _TAG.match(p.name) and (p / MARKER).is_file()]
        return sorted(tags, key=lambda t: int(_TAG.match(t).group(1)))

    def latest(self) -> Path | None:
        """The newest checkpoint with a marker (cheap; :meth:`newest_verified` is what resume uses)."""
        tags = self.complete_tags()
        return self.dir / tags[-1] if tags else None

    # ---- writing ---------------------------------------------------------------------------------
    def save(self, strategy, step: int, client_state: dict) -> Path:
        """Collective: every rank calls it. Returns the final checkpoint directory."""
        tag = self.tag(step)
        partial = self.dir / f"{tag}.partial"
        final = self.dir / tag
        if self.topology.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        self.topology.barrier()
        error = None
        try:
            strategy.save(self.dir, partial.name, client_state)
            torch.save(rng_state(), partial / f"rng_rank{self.topology.rank}.pt")
        except (OSError, RuntimeError) as err:  # torch's writer raises RuntimeError for I/O failures
            error = _describe_write_error(err, partial)
        error = _agree_ok(error, self.topology)
        if error is None:
            error = _agree_ok(self._write_manifest(partial), self.topology)
        if error is not None:
            if self.topology.is_main:
                shutil.rmtree(partial, ignore_errors=True)
            self.topology.barrier()
            previous = self.latest()
            raise CheckpointWriteError(f"{error}; the latest checkpoint is still "
                                       f"{previous if previous is not None else '(none)'}")
        if self.topology.is_main:
            meta = {"step": step, "world_size": self.topology.world_size, "dp": self.topology.dp,
                    "tp": self.topology.tp, "pp": self.topology.pp}
            write_text_atomic(partial / MARKER, json.dumps(meta))
            if final.exists():  # a re-save of the same step (e.g. after resume): replace it whole
                self._remove(final)
            os.rename(partial, final)
            write_text_atomic(self.dir / "latest", tag)
            self._prune()
        self.topology.barrier()
        return final

    def _write_manifest(self, partial: Path) -> str | None:
        """Collective: the ranks checksum the checkpoint's files between them; rank 0 writes the
        manifest. Returns this rank's error message, if any."""
        try:
            files = _files(partial) if self.topology.is_main else None
            files = _gather(files, self.topology)[0]
            mine = {rel: {"size": (partial / rel).stat().st_size, "sha256": _sha256(partial / rel)}
                    for rel in files[self.topology.rank::self.topology.world_size]}
            entries = {}
            for part in _gather(mine, self.topology):
                entries.update(part)
            if self.topology.is_main:
                write_text_atomic(partial / MANIFEST, json.dumps({"files": entries}, indent=1, sort_keys=True))
        except OSError as err:
            return _describe_write_error(err, partial)
        return None

    # ---- verifying and choosing --------------------------------------------------------------------
    def verify(self, path: Path) -> str | None:
        """Collective: why ``path`` cannot be resumed from, or None when its marker parses and every
        file matches the manifest (checked by the ranks between them)."""
        problem, meta, files = None, None, None
        if self.topology.is_main:
            try:
                meta = json.loads((path / MARKER).read_text())
                if not isinstance(meta, dict) or "step" not in meta:
                    raise ValueError("no step")
            except (OSError, ValueError) as err:
                problem = f"its {MARKER} marker is unreadable ({type(err).__name__})"
            if problem is None and (path / MANIFEST).is_file():
                try:
                    files = json.loads((path / MANIFEST).read_text())["files"]
                    if not all(isinstance(e, dict) and {"size", "sha256"} <= e.keys() for e in files.values()):
                        raise ValueError("bad entry")
                except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                    problem = f"its {MANIFEST} is unreadable ({type(err).__name__})"
                    files = None
        problem, files = _gather((problem, files), self.topology)[0]
        if problem is not None:
            return problem
        if files is None:
            # Written before manifests existed: the marker is all there is to go on.
            log.warning("checkpoint %s has no %s; resuming from it unverified", path, MANIFEST)
            return None
        names = sorted(files)
        mine = None
        for rel in names[self.topology.rank::self.topology.world_size]:
            file = path / rel
            if not file.is_file():
                mine = f"{rel} is missing"
            elif file.stat().st_size != files[rel]["size"]:
                mine = f"{rel} has {file.stat().st_size} bytes, the manifest says {files[rel]['size']}"
            elif _sha256(file) != files[rel]["sha256"]:
                mine = f"{rel} does not match its checksum"
            if mine:
                break
        return _agree_ok(mine, self.topology)

    def newest_verified(self) -> Path | None:
        """Collective: the newest checkpoint that verifies; None when there is no checkpoint at all.
        Raises when checkpoints exist but none verifies (starting over would silently lose them)."""
        tags = _gather(self.complete_tags() if self.topology.is_main else None, self.topology)[0]
        rejected = []
        for tag in reversed(tags):
            problem = self.verify(self.dir / tag)
            if problem is None:
                if rejected:
                    log.warning("resuming from %s instead: %s", self.dir / tag, "; ".join(rejected))
                return self.dir / tag
            rejected.append(f"{self.dir / tag} is unusable ({problem})")
            log.warning("checkpoint %s is unusable: %s", self.dir / tag, problem)
        if rejected:
            raise RunError("no checkpoint in {} can be resumed from: {}. Remove the broken ones, or start "
                           "the stage over with checkpoint.on_change=restart".format(self.dir, "; ".join(rejected)))
        return None

    def load(self, strategy, path: Path) -> dict:
        """Collective: restore model, optimizer, scheduler and RNG from a verified ``path``; return the
        client state. A different layout is the strategy's to reshard (``saved`` is the marker)."""
        saved = json.loads((path / MARKER).read_text())
        client_state = strategy.load(path.parent, path.name, saved)
        rng_file = path / f"rng_rank{self.topology.rank}.pt"
        if saved.get("world_size") == self.topology.world_size and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            derive_rng_state(self.seed, int(client_state["step"]), self.topology.rank)
        return client_state

    # ---- pruning ----------------------------------------------------------------------------------
    def _remove(self, checkpoint: Path) -> None:
        """Marker first: a crash mid-delete leaves a directory nobody will take for a checkpoint."""
        (checkpoint / MARKER).unlink(missing_ok=True)
        shutil.rmtree(checkpoint, ignore_errors=True)
        shutil.rmtree(checkpoint.with_name(checkpoint.name + ".universal"), ignore_errors=True)

    def _prune(self) -> None:
        for stale in self.dir.glob("*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
        tags = self.complete_tags()
        for old in tags[: max(0, len(tags) - self.keep_last)]:
            self._remove(self.dir / old)
