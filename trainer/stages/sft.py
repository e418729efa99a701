"""Supervised fine-tuning: its data, loss and evaluation on the shared loop (trainer/stages/loop.py).

Loss on assistant tokens only. ``stage.loss_reduction=token`` is LongWriter's long-ce: the token NLL
of every micro-batch on every data-parallel rank is divided by the target-token count of the whole
global batch, counted up front with one all-reduce, so the update does not depend on how the global
batch was split across ranks and micro-batches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
import logging

import torch
from omegaconf import DictConfig

from trainer.data.chat import collate
from trainer.data.packing import pack_examples, segment_sum
from trainer.losses import sft_loss_from_logps
from trainer.models import NEFTune, build_model
from trainer.config.validate import resolve_layout
from trainer.parallel.topology import Topology
from trainer.data.records import validate_chat_record
from trainer.data.sources import RecordStream
from trainer.stages import common, loop
from trainer.stages.loop import Job
from trainer.stages.evaluation import generation_accuracy

log = logging.getLogger(__name__)


def micro_batch_loss(logps: torch.Tensor, batch: dict, reduction: str, global_tokens: torch.Tensor,
                     global_batch_size: int) -> torch.Tensor:
    """This micro-batch's share of the global-batch loss (the shares sum to the global loss)."""
    if reduction == "token":
        return sft_loss_from_logps(logps, batch["loss_mask"], "token", num_tokens=global_tokens)
    if "seq_id" in batch:  # packed rows: per-sequence means from segment sums
        n, mask = int(batch["num_sequences"]), batch["loss_mask"].to(logps.dtype)
        nll = segment_sum(-logps * mask, batch["seq_id"], n) / segment_sum(mask, batch["seq_id"], n).clamp(min=1)
        return nll.sum() / global_batch_size
    rows = batch["loss_mask"].shape[0]
    return sft_loss_from_logps(logps, batch["loss_mask"], "sample") * (rows / global_batch_size)


@torch.no_grad()
def evaluate(strategy, examples: list[dict], make_batch: Callable, micro_batch_size: int, topology: Topology) -> dict:
    """Token-mean NLL over the eval set, sharded across data-parallel ranks and summed exactly; batches in
    the training layout (``make_batch``: packed or padded rows)."""
    if not examples:
        return {}
    strategy.eval()
    nll = torch.zeros((), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    for ids, chunk in common.sharded_batches(examples, micro_batch_size, topology):
        batch = common.to_device(make_batch(chunk), topology.device)
        logps = strategy.token_logps(batch)
        if ids:
            nll -= (logps * batch["loss_mask"]).sum().double().cpu()
            tokens += batch["loss_mask"].sum().double().cpu()
    strategy.train()
    nll = common.all_reduce_sum(nll, topology.dp_group)
    tokens = common.all_reduce_sum(tokens, topology.dp_group)
    return {"eval_loss": (nll / tokens.clamp(min=1)).item(), "eval_tokens": int(tokens.item())}


def setup(cfg: DictConfig, topology: Topology, tokenizer) -> Job:
    stage = cfg.stage
    train_files, eval_files = common.data_files(cfg, topology, "sft")
    train, train_stats = common.train_examples(cfg, train_files, lambda files: common.tokenized_chat_dataset(
        files, tokenizer, cfg.data, topology))
    evals, _ = common.tokenized_chat_dataset(eval_files, tokenizer, cfg.data, topology)
    pad_id = tokenizer.pad_token_id
    packing = resolve_layout(cfg)["packing"]
    make_batch = (functools.partial(pack_examples, max_length=cfg.data.max_length, pad_id=pad_id) if packing
                  else functools.partial(collate, pad_id=pad_id))
    neftune: list[NEFTune] = []

    def add_neftune(strategy):
        if stage.neftune_alpha <= 0:
            return None
        neftune.append(NEFTune(strategy.module, stage.neftune_alpha))
        return neftune[0].remove

    def step(strategy, step: int, batches: list[dict]) -> tuple[dict, float]:
        local_inputs = sum(b["attention_mask"].sum() if "attention_mask" in b else (b["seq_id"] >= 0).sum()
                           for b in batches)
        targets, inputs = common.all_reduce_sums([sum(b["loss_mask"].sum() for b in batches), local_inputs],
                                                 topology.dp_group)
        global_targets = torch.tensor(targets, dtype=torch.float32)
        info = strategy.train_step(
            batches,
            lambda logps, batch: micro_batch_loss(logps, batch, stage.loss_reduction,
                                                  global_targets.to(logps.device), stage.global_batch_size),
            on_micro_batch=None if not neftune else (
                lambda k: neftune[0].reseed(cfg.run.seed, step, k, topology.dp_rank)))
        loss = common.all_reduce_sum(info["loss"], topology.dp_group).item()
        return {**info, "loss": loss, "target_tokens": int(targets)}, inputs

    def final(strategy) -> dict:
        if not evals or stage.eval_max_new_tokens <= 0:
            return {}
        records = [r for path in eval_files for _, r in RecordStream(path, validate_chat_record, "skip")]
        accuracy = generation_accuracy(strategy, records, tokenizer, topology, stage.eval_max_new_tokens,
                                       stage.micro_batch_size)
        return {f"eval_{k}": v for k, v in accuracy.items()}

    return Job(train=train, train_stats=train_stats, make_batch=make_batch, step=step, final=final,
               make_model=lambda: build_model(cfg.model, len(tokenizer), cfg.run.seed),
               evaluate=lambda strategy: evaluate(strategy, evals, make_batch, stage.micro_batch_size, topology),
               on_strategy=add_neftune)


def run(cfg: DictConfig, topology: Topology) -> dict:
    return loop.train(cfg, topology, setup)
