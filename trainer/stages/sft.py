"""Supervised fine-tuning: one readable loop (setup, train, export).

Loss on assistant tokens only. ``stage.loss_reduction=token`` is LongWriter's long-ce: the token NLL
of every micro-batch on every data-parallel rank is divided by the target-token count of the whole
global batch, counted up front with one all-reduce, so the update does not depend on how the global
batch was split across ranks and micro-batches.
"""

from __future__ import annotations

import functools
import logging
import time

import torch
from omegaconf import DictConfig

from trainer.data.chat import collate
from trainer.data.packing import pack_examples, segment_sum
from trainer.data.sampler import GlobalBatchPlan
from trainer.losses import sft_loss_from_logps
from trainer.models import NEFTune, build_model
from trainer.parallel.topology import Topology
from trainer.data.records import read_jsonl, validate_chat_record
from trainer.stages import common
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
def evaluate(strategy, examples: list[dict], pad_id: int, micro_batch_size: int, topology: Topology) -> dict:
    """Token-mean NLL over the eval set, sharded across data-parallel ranks and summed exactly."""
    strategy.eval()
    mine = examples[topology.dp_rank::topology.dp]
    nll = torch.zeros((), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    for i in range(0, len(mine), micro_batch_size):
        batch = common.to_device(collate(mine[i:i + micro_batch_size], pad_id), topology.device)
        logps = strategy.token_logps(batch)
        nll -= (logps * batch["loss_mask"]).sum().double().cpu()
        mask_tokens = batch["loss_mask"].sum()
        tokens += mask_tokens.double().cpu()
    strategy.train()
    nll = common.all_reduce_sum(nll, topology.dp_group)
    tokens = common.all_reduce_sum(tokens, topology.dp_group)
    return {"eval_loss": (nll / tokens.clamp(min=1)).item(), "eval_tokens": int(tokens.item())}


def run(cfg: DictConfig, topology: Topology) -> dict:
    stage = cfg.stage
    out, finished = common.start(cfg, topology)
    if finished is not None:
        return finished

    # ---- setup -----------------------------------------------------------------------------------
    tokenizer = common.build_tokenizer(cfg)
    train_files, eval_files = common.data_files(cfg, topology)
    train, train_stats = common.tokenized_chat_dataset(train_files, tokenizer, cfg.data)
    evals, _ = common.tokenized_chat_dataset(eval_files, tokenizer, cfg.data)
    log.info("train data: %s", train_stats)
    plan = GlobalBatchPlan(len(train), stage.global_batch_size, stage.micro_batch_size, topology.dp, cfg.run.seed)
    total_steps = common.total_steps(stage, plan.steps_per_epoch)

    strategy = common.setup_strategy(cfg, topology, plan.grad_accum, total_steps,
                                     lambda: build_model(cfg.model, len(tokenizer), cfg.run.seed))
    neftune = NEFTune(strategy.module, stage.neftune_alpha) if stage.neftune_alpha > 0 else None
    checkpoints, start_step, logger = common.restore(cfg, topology, strategy, total_steps)
    pad_id = tokenizer.pad_token_id
    make_batch = (functools.partial(pack_examples, max_length=cfg.data.max_length, pad_id=pad_id) if stage.packing
                  else functools.partial(collate, pad_id=pad_id))

    # ---- train -----------------------------------------------------------------------------------
    strategy.train()
    bad_steps = common.BadSteps(stage)
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        batches = [common.to_device(make_batch([train[i] for i in ids]), topology.device)
                   for ids in plan.micro_batches(step, topology.dp_rank)]
        local_inputs = sum(b["attention_mask"].sum() if "attention_mask" in b else (b["seq_id"] >= 0).sum()
                           for b in batches)
        targets, inputs = common.all_reduce_sums([sum(b["loss_mask"].sum() for b in batches), local_inputs],
                                                 topology.dp_group)
        global_targets = torch.tensor(targets, dtype=torch.float32)
        info = strategy.train_step(
            batches,
            lambda logps, batch: micro_batch_loss(logps, batch, stage.loss_reduction,
                                                  global_targets.to(logps.device), stage.global_batch_size),
            on_micro_batch=None if neftune is None else (
                lambda k: neftune.reseed(cfg.run.seed, step, k, topology.dp_rank)))
        elapsed = time.perf_counter() - t0
        metrics = {**info, "loss": common.all_reduce_sum(info["loss"], topology.dp_group).item(),
                   "target_tokens": int(targets), "tokens_per_s": inputs / elapsed,
                   "epoch": step // plan.steps_per_epoch}
        done = step + 1
        if stage.eval_every and done % stage.eval_every == 0 and done < total_steps:
            metrics.update(evaluate(strategy, evals, pad_id, stage.micro_batch_size, topology))
        bad_steps.update(done, info, metrics)
        logger.log(done, metrics)
        common.after_step(cfg, topology, checkpoints, strategy, done, total_steps, bad_steps)

    # ---- finish ----------------------------------------------------------------------------------
    result = {"stage": stage.name, "type": "sft", "steps": total_steps, "train_data": train_stats}
    if evals:
        result.update(evaluate(strategy, evals, pad_id, stage.micro_batch_size, topology))
        if stage.eval_max_new_tokens > 0:
            records = [r for path in eval_files for r in read_jsonl(path, validate_chat_record, "skip")[0]]
            accuracy = generation_accuracy(strategy, records, tokenizer, topology, stage.eval_max_new_tokens,
                                           stage.micro_batch_size)
            result.update({f"eval_{k}": v for k, v in accuracy.items()})
        logger.log(total_steps, {k: v for k, v in result.items() if k.startswith("eval_")})
    if neftune is not None:
        neftune.remove()
    return common.finish(cfg, topology, strategy, checkpoints, tokenizer, logger, total_steps, result)
