"""The interface every training strategy implements, and the factory that picks one by config.

A stage loop only ever talks to this interface: it hands a strategy a model and its micro-batches and a
loss function over per-token log-probs, never the engine underneath. Each method that gathers or
reduces is a collective and must be called on every rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ContextManager, Protocol

import torch
from omegaconf import DictConfig

from trainer.parallel.topology import Topology

# loss_fn(outputs, batch) -> this micro-batch's share of the global-batch loss, where outputs are
# per-token log-probs [B, T] for a CausalLM and attribute scores [B, A] for a reward model.
LossFn = Callable[[torch.Tensor, dict], torch.Tensor]


def at_stop(tokens: torch.Tensor, eos_token_id: int | list[int]) -> torch.Tensor:
    """Where ``tokens`` is one of ``generate``'s stop ids (bool, same shape). Several ids are common:
    Llama-3 and Phi-3 list their end-of-turn and end-of-text tokens, and a chat model ends its turn
    with the first."""
    ids = torch.as_tensor(eos_token_id, dtype=tokens.dtype, device=tokens.device).reshape(-1)
    return torch.isin(tokens, ids)


class Strategy(Protocol):
    def model_init_context(self, micro_batch_size: int, grad_accum: int, pretrained: bool) -> ContextManager:
        """The context the stage builds (``pretrained``: loads) its model in, e.g. to load it sharded."""

    def setup(self, model: torch.nn.Module, optim: DictConfig, micro_batch_size: int, grad_accum: int,
              total_steps: int) -> None:
        """Wrap ``model`` (float32, CPU, unsharded) with its optimizer and LR schedule."""

    def setup_inference(self, model: torch.nn.Module, micro_batch_size: int) -> None:
        """Wrap ``model`` for forward passes only (a reference model), sharded like training."""

    def train_step(self, batches: list[dict[str, torch.Tensor]], loss_fn: LossFn,
                   on_micro_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
        """One optimizer step over this rank's micro-batches; returns {"loss": local sum of shares
        (tensor), "grad_norm": float, "lr": float, "skipped": bool}. A step whose loss or gradient norm
        is not finite is not applied (``skipped``, the same on every rank); the LR schedule still
        advances, so the step count and the schedule stay the plan's."""

    def token_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward: log p(labels | context) per position, [B, T] (packed batches: position_ids, no
        attention_mask). Only positions with a non-zero ``loss_mask`` (when the batch has one) are
        guaranteed: a strategy may skip the LM head elsewhere and return 0 there."""

    def outputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward: what loss_fn receives (token log-probs, or a reward model's scores)."""

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 eos_token_id: int | list[int], pad_token_id: int) -> torch.Tensor:
        """Greedy continuation of left-padded prompts, [B, prompt + new]; a collective. A row ends at
        the first of its tokens that is any of ``eos_token_id`` (see :func:`at_stop`) and is padded
        with ``pad_token_id`` after it; generation stops when every row has ended."""

    def from_last_stage(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` as the last pipeline stage holds it, on every rank of its pipeline: what a loss_fn
        recorded on the side during ``train_step`` (only the last stage runs loss_fn). A collective;
        the identity without pipeline parallelism."""

    def train(self) -> None: ...

    def eval(self) -> None: ...

    def save(self, ckpt_dir: Path, tag: str, client_state: dict) -> None:
        """Write this rank's shards of model, optimizer and schedule under ``ckpt_dir / tag``."""

    def load(self, ckpt_dir: Path, tag: str, saved: dict | None = None) -> dict:
        """Restore from ``ckpt_dir / tag``, written in the layout ``saved`` (the checkpoint's marker:
        world_size, dp, tp, pp; None: this run's), resharding when it differs; returns the client state."""

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Unsharded Hugging Face-named weights on rank 0, None elsewhere."""

    @property
    def module(self) -> torch.nn.Module:
        """The Hugging Face model object whose config ``save_pretrained`` writes."""


def poison_nonfinite(loss: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale``, or NaN when ``loss`` is not finite: the factor a strategy multiplies a micro-batch loss
    by before backward. A NaN loss does not always give NaN gradients (a NaN constant term has zero
    gradient); times NaN it always does, so the strategy's one gradient-norm check, already reduced
    over every rank, catches a bad loss on any rank without a collective of its own."""
    return torch.where(torch.isfinite(loss.detach()), torch.as_tensor(scale, dtype=loss.dtype, device=loss.device),
                       torch.as_tensor(float("nan"), dtype=loss.dtype, device=loss.device))


def build_strategy(parallel: DictConfig, topology: Topology) -> Strategy:
    if parallel.strategy == "deepspeed":
        from trainer.parallel.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(parallel, topology)
    if parallel.strategy == "megatron":
        from trainer.parallel.megatron import MegatronStrategy

        return MegatronStrategy(parallel, topology)
    raise ValueError(f"parallel.strategy: unknown strategy {parallel.strategy!r}")
