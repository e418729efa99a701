"""Sharded checkpoints that a torn write can never pass off as the latest.

Layout under ``<stage>/checkpoints/``::

    step_000006/            one complete checkpoint (DeepSpeed shards + rng_rank*.pt + COMPLETE)
    step_000009.partial/    being written, or torn by a crash: ignored and cleaned up
    latest                  text file naming the newest complete tag, replaced atomically

A checkpoint is written under ``<tag>.partial``; only after every rank has finished does rank 0 write
the ``COMPLETE`` marker, rename the directory to ``<tag>`` and then replace ``latest``. A crash at any
point leaves either the previous ``latest`` intact or a complete new one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from trainer.parallel.topology import Topology

_TAG = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"


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


class CheckpointManager:
    def __init__(self, directory: Path, keep_last: int, topology: Topology):
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.topology = topology

    @staticmethod
    def tag(step: int) -> str:
        return f"step_{step:06d}"

    def complete_tags(self) -> list[str]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        tags = [p.name for p in self.dir.iterdir() if _TAG.match(p.name) and (p / MARKER).is_file()]
        return sorted(tags, key=lambda t: int(_TAG.match(t).group(1)))

    def latest(self) -> Path | None:
        """The newest complete checkpoint: the one ``latest`` names, else the newest with a marker."""
        pointer = self.dir / "latest"
        if pointer.is_file():
            candidate = self.dir / pointer.read_text().strip()
            if (candidate / MARKER).is_file():
                return candidate
        tags = self.complete_tags()
        return self.dir / tags[-1] if tags else None

    def save(self, strategy, step: int, client_state: dict) -> Path:
        """Collective: every rank calls it. Returns the final checkpoint directory."""
        tag = self.tag(step)
        partial = self.dir / f"{tag}.partial"
        final = self.dir / tag
        if self.topology.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        self.topology.barrier()
        strategy.save(self.dir, partial.name, client_state)
        torch.save(rng_state(), partial / f"rng_rank{self.topology.rank}.pt")
        self.topology.barrier()
        if self.topology.is_main:
            meta = {"step": step, "world_size": self.topology.world_size, "dp": self.topology.dp,
                    "tp": self.topology.tp, "pp": self.topology.pp}
            write_text_atomic(partial / MARKER, json.dumps(meta))
            if final.exists():  # a re-save of the same step (e.g. after resume): replace it whole
                shutil.rmtree(final)
            os.rename(partial, final)
            write_text_atomic(self.dir / "latest", tag)
            self._prune()
        self.topology.barrier()
        return final

    def load(self, strategy, path: Path) -> dict:
        """Collective: restore model, optimizer, scheduler and this rank's RNG; return the client state."""
        meta = json.loads((path / MARKER).read_text())
        same_layout = meta["world_size"] == self.topology.world_size and meta["tp"] == self.topology.tp
        # Strategies whose checkpoints reshard on load (megatron dist_checkpointing) accept any layout.
        if not same_layout and not getattr(strategy, "reshardable_checkpoints", False):
            raise RuntimeError(
                f"checkpoint {path} was written with world size {meta['world_size']} (tp={meta['tp']}); this run "
                f"has {self.topology.world_size} (tp={self.topology.tp}). Resume with the same layout, or convert "
                "it with `python -m deepspeed.checkpoint.ds_to_universal` (see docs/checkpoints.md)")
        client_state = strategy.load(path.parent, path.name)
        set_rng_state(torch.load(path / f"rng_rank{self.topology.rank}.pt", weights_only=False))
        return client_state

    def _prune(self) -> None:
        for stale in self.dir.glob("*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
        tags = self.complete_tags()
        for old in tags[: max(0, len(tags) - self.keep_last)]:
            shutil.rmtree(self.dir / old, ignore_errors=True)
