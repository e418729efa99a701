"""The megatron strategy's checkpoints: ``megatron.core.dist_checkpointing`` of the GPTModel chunks, the
optimizer (the distributed optimizer's ``fully_reshardable`` format, so a checkpoint written in one
TP/PP/DP layout loads in another), the optimizer-step counter and the stage's client state.

Also the two workarounds megatron-core 0.16 needs to load into torch AdamW, its optimizer when neither
Apex nor Transformer Engine is installed (CPU, and GPU installs without them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

# The distributed optimizer's checkpoint format that reshards over TP, PP and DP.
_OPTIM_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


def _sharded_state_dict(chunks: list, optimizer, step: int, client_state: dict | None, loading: bool) -> dict:
    state: dict[str, Any] = {}
    for i, chunk in enumerate(chunks):
        state["model" if len(chunks) == 1 else f"model{i}"] = chunk.sharded_state_dict()
    model_state = state if len(chunks) > 1 else state["model"]
    state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=loading, metadata=_OPTIM_FORMAT)
    state["step"] = step
    state["client_state"] = client_state
    return state


def save(path: Path, chunks: list, optimizer, step: int, client_state: dict, is_main: bool) -> None:
    """A collective: every rank writes its shards under ``path``."""
    if is_main:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state_dict(chunks, optimizer, step, client_state, loading=False), str(path))


def load(path: Path, chunks: list, optimizer) -> tuple[int, dict]:
    """Restore the chunks' weights and the optimizer from ``path``; returns (step, client state)."""
    _init_torch_adam_state(optimizer)
    state = dist_checkpointing.load(_sharded_state_dict(chunks, optimizer, 0, None, loading=True), str(path))
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state["model" if len(chunks) == 1 else f"model{i}"])
    _load_optimizer(optimizer, state["optimizer"])
    return int(state["step"]), state["client_state"]


def _chained(optimizer) -> list:
    """The optimizers megatron chains (one per parameter group kind), or the one optimizer."""
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _init_torch_adam_state(optimizer) -> None:
    """Give a fresh torch AdamW its lazily created state. megatron 0.16's distributed optimizer reads one
    common ``step`` from that state when it builds the sharded state dict to load into, and its own
    init_state_fn does not create ``step``."""
    for opt in (c.optimizer for c in _chained(optimizer)):
        if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in opt.param_groups:
            for p in group["params"]:
                if not opt.state[p]:
                    opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                    "exp_avg_sq": torch.zeros_like(p)}


def _load_optimizer(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict``, working around two megatron 0.16 issues with torch AdamW: loading
    the distributed optimizer's fully-reshardable parameter state copies every per-parameter state
    entry from the checkpoint, which has no per-parameter ``step``, so it fails on the ``step`` torch
    keeps there (set aside around that copy); and the restored ``step`` is one tensor shared by all
    parameters (un-aliased here)."""
    chained = _chained(optimizer)
    states = [state] if len(chained) == 1 else [state[i] for i in range(len(chained))]
    for opt, sub in zip(chained, states):
        if not isinstance(opt.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            opt.load_state_dict(sub)
            continue
        param_state = None
        if isinstance(sub, dict) and sub.get("param_state_sharding_type") == "fully_reshardable":
            param_state = sub.pop("param_state")
            sub.pop("param_state_sharding_type")
        opt.load_state_dict(sub)  # hyper-parameters, grad scaler, the common step
        # megatron hands every parameter the SAME ``step`` tensor; torch AdamW increments each
        # parameter's step in place, so shared it would advance once per parameter per step.
        steps = {p: st.pop("step").clone() for p, st in opt.optimizer.state.items() if "step" in st}
        try:
            if param_state is not None:
                opt.load_parameter_state_from_fully_reshardable(param_state)
        finally:
            for p, step in steps.items():
                opt.optimizer.state[p]["step"] = step
