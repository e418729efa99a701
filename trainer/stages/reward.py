"""Multi-attribute reward model: one readable loop (setup, train, export).

A linear head on a CausalLM backbone predicts each HelpSteer2 attribute of a response (SteerLM /
HelpSteer2, Wang et al. 2024; Nemotron-4 340B Reward). The loss is the masked MSE over every annotated
(sample, attribute) entry of the GLOBAL batch: each micro-batch contributes its summed squared error
divided by the number of annotated entries of the whole global batch, counted up front with one
all-reduce (as sft's long-ce does with target tokens), so the update does not depend on how the global
batch was split across ranks and micro-batches, nor on which records miss an attribute.

Evaluation: held-out masked MSE per attribute and overall, for the trained model, the untrained one
(measured before training, so the result shows the drop) and the best constant predictor (each
attribute's training mean: what a model that ignores its input can reach).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from trainer.data.preference import collate_reward, tokenize_reward_example, validate_reward_record
from trainer.data.sampler import GlobalBatchPlan
from trainer.losses.reward import reward_regression_loss
from trainer.models.reward import build_reward_model
from trainer.parallel.topology import Topology
from trainer.stages import common

log = logging.getLogger(__name__)


def tokenized_reward_dataset(paths: list[Path], tokenizer, data_cfg: DictConfig,
                             attributes: list[str]) -> tuple[list[dict], dict]:
    """Every record of ``paths`` tokenised with its targets, and counts of what was dropped.

    A bad record raises ``DataError`` naming ``file:line`` (or is skipped and counted, per
    ``data.on_bad_record``)."""
    # No shift as in SFT: the head reads position last_index itself, so max_length positions.
    return common.tokenized_records(
        paths, lambda rec: validate_reward_record(rec, attributes),
        lambda record: tokenize_reward_example(tokenizer, record, attributes, data_cfg.max_length), data_cfg)


def micro_batch_loss(scores: torch.Tensor, batch: dict, global_entries: torch.Tensor) -> torch.Tensor:
    """This micro-batch's share of the global masked MSE: its summed squared error / global entries.

    ``reward_regression_loss`` is the micro-batch's own masked mean; times its entry count it is the
    masked sum (0 for a micro-batch with no annotated entry)."""
    mask = batch["target_mask"]
    local_mse = reward_regression_loss(scores.float(), batch["targets"], mask)
    return local_mse * mask.sum() / global_entries


def attribute_means(examples: list[dict], num_attributes: int) -> torch.Tensor:
    """Each attribute's mean annotated score over ``examples`` (0 where never annotated), [A]."""
    targets = torch.tensor([ex["targets"] for ex in examples], dtype=torch.float64).reshape(-1, num_attributes)
    mask = torch.tensor([ex["target_mask"] for ex in examples], dtype=torch.float64).reshape(-1, num_attributes)
    return (targets * mask).sum(0) / mask.sum(0).clamp(min=1)


def _mse_metrics(sq_err: torch.Tensor, entries: torch.Tensor, attributes: list[str], prefix: str) -> dict:
    metrics = {f"{prefix}/{name}": (sq_err[k] / entries[k]).item()
               for k, name in enumerate(attributes) if entries[k] > 0}
    metrics[prefix] = (sq_err.sum() / entries.sum().clamp(min=1)).item()
    return metrics


@torch.no_grad()
def evaluate(strategy, examples: list[dict], pad_id: int, micro_batch_size: int, topology: Topology,
             attributes: list[str], prefix: str = "eval_mse") -> dict:
    """Masked MSE per attribute and overall, sharded across data-parallel ranks and summed exactly.

    Every rank runs the same number of forwards (ZeRO-3 gathers parameters inside forward), a rank
    short of examples repeating its first batch with its result discarded."""
    strategy.eval()
    mine = examples[topology.dp_rank::topology.dp]
    calls = math.ceil(math.ceil(len(examples) / topology.dp) / micro_batch_size)
    sq_err = torch.zeros(len(attributes), dtype=torch.float64)
    entries = torch.zeros(len(attributes), dtype=torch.float64)
    for c in range(calls):
        chunk = mine[c * micro_batch_size:(c + 1) * micro_batch_size]
        batch = common.to_device(collate_reward(chunk or examples[:1], pad_id), topology.device)
        scores = strategy.outputs(batch).double()
        if chunk:
            mask = batch["target_mask"].double()
            sq_err += (mask * (scores - batch["targets"].double()) ** 2).sum(0).cpu()
            entries += mask.sum(0).cpu()
    strategy.train()
    sq_err = common.all_reduce_sum(sq_err, topology.dp_group)
    entries = common.all_reduce_sum(entries, topology.dp_group)
    return _mse_metrics(sq_err, entries, attributes, prefix)


def constant_predictor_mse(train: list[dict], evals: list[dict], attributes: list[str]) -> dict:
    """Eval MSE of predicting every attribute's training mean: the bar a model must beat to have learnt
    anything from its input (pure CPU, identical on every rank)."""
    means = attribute_means(train, len(attributes))
    targets = torch.tensor([ex["targets"] for ex in evals], dtype=torch.float64)
    mask = torch.tensor([ex["target_mask"] for ex in evals], dtype=torch.float64)
    return _mse_metrics((mask * (targets - means) ** 2).sum(0), mask.sum(0), attributes, "eval_mse_constant")


def run(cfg: DictConfig, topology: Topology) -> dict:
    stage = cfg.stage
    out, finished = common.start(cfg, topology)
    if finished is not None:
        return finished

    # ---- setup -----------------------------------------------------------------------------------
    attributes = list(stage.attributes)
    tokenizer = common.build_tokenizer(cfg)
    train_files, eval_files = common.data_files(cfg, topology, "reward")
    train, train_stats = tokenized_reward_dataset(train_files, tokenizer, cfg.data, attributes)
    evals, _ = tokenized_reward_dataset(eval_files, tokenizer, cfg.data, attributes)
    log.info("train data: %s", train_stats)
    plan = GlobalBatchPlan(len(train), stage.global_batch_size, stage.micro_batch_size, topology.dp, cfg.run.seed)
    total_steps = common.total_steps(stage, plan.steps_per_epoch)

    strategy = common.setup_strategy(
        cfg, topology, plan.grad_accum, total_steps,
        lambda: build_reward_model(cfg.model, len(tokenizer), cfg.run.seed, attributes, stage.attribute_weights))
    pad_id = tokenizer.pad_token_id
    # Measured on every (re)start before any checkpoint is loaded: the starting model is a pure
    # function of the config (seeded init or model.path), so this is the same number each time.
    untrained = {}
    if evals:
        untrained = evaluate(strategy, evals, pad_id, stage.micro_batch_size, topology, attributes,
                             "eval_mse_untrained")
        untrained.update(constant_predictor_mse(train, evals, attributes))
    checkpoints, start_step, logger = common.restore(cfg, topology, strategy, total_steps)
    if start_step == 0 and untrained:
        logger.log(0, untrained)

    # ---- train -----------------------------------------------------------------------------------
    strategy.train()
    bad_steps = common.BadSteps(stage)
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        batches = [common.to_device(collate_reward([train[i] for i in ids], pad_id), topology.device)
                   for ids in plan.micro_batches(step, topology.dp_rank)]
        entries, inputs = common.all_reduce_sums([sum(b["target_mask"].sum() for b in batches),
                                                  sum(b["attention_mask"].sum() for b in batches)], topology.dp_group)
        global_entries = torch.tensor(entries, dtype=torch.float32)
        info = strategy.train_step(
            batches, lambda scores, batch: micro_batch_loss(scores, batch, global_entries.to(scores.device)))
        elapsed = time.perf_counter() - t0
        metrics = {**info, "loss": common.all_reduce_sum(info["loss"], topology.dp_group).item(),
                   "target_entries": int(entries), "tokens_per_s": inputs / elapsed,
                   "epoch": step // plan.steps_per_epoch}
        done = step + 1
        if stage.eval_every and done % stage.eval_every == 0 and done < total_steps:
            metrics.update(evaluate(strategy, evals, pad_id, stage.micro_batch_size, topology, attributes))
        bad_steps.update(done, info, metrics)
        logger.log(done, metrics)
        common.after_step(cfg, topology, checkpoints, strategy, done, total_steps, bad_steps)

    # ---- finish ----------------------------------------------------------------------------------
    result = {"stage": stage.name, "type": "reward", "steps": total_steps, "train_data": train_stats,
              "attributes": attributes, "attribute_weights": list(stage.attribute_weights)}
    if evals:
        result.update(evaluate(strategy, evals, pad_id, stage.micro_batch_size, topology, attributes))
        result.update(untrained)
        logger.log(total_steps, {k: v for k, v in result.items() if k.startswith("eval_")})
    # Final checkpoint, then hf/ (RewardModel.save_pretrained: backbone + head + reward_config.json).
    return common.finish(cfg, topology, strategy, checkpoints, tokenizer, logger, total_steps, result)
