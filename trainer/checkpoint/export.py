"""Export a trained model as a transformers-loadable directory (weights + config + tokenizer)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from trainer.parallel.topology import Topology


def export_hf(strategy, tokenizer, out_dir: Path, topology: Topology) -> Path:
    """Collective. Gathers the full weights to rank 0 and writes ``out_dir`` atomically.

    The model is written to ``<out_dir>.tmp`` and swapped in by rename, so a reader (or a later stage
    starting from this export) never sees a half-written directory.
    """
    state_dict = strategy.full_state_dict()
    out_dir = Path(out_dir)
    if topology.is_main:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        model = strategy.module
        model.config.use_cache = True
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        model.config.use_cache = False
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    topology.barrier()
    return out_dir
