"""Multi-attribute reward model: its data, loss and evaluation on the shared loop (trainer/stages/loop.py).

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
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig

from trainer.data.preference import collate_reward, tokenize_reward_example, validate_reward_record
from trainer.losses.reward import reward_regression_loss
from trainer.models.reward import build_reward_model
from trainer.parallel.topology import Topology
from trainer.stages import common, loop
from trainer.stages.loop import Job

log = logging.getLogger(__name__)


def tokenized_reward_dataset(paths: list[Path], tokenizer, data_cfg: DictConfig, attributes: list[str],
                             topology: Topology | None = None) -> tuple[Sequence[dict], dict]:
    """Every record of ``paths`` tokenised with its targets, and counts of what was dropped (through the
    shared tokenised cache when ``topology`` is given).

    A bad record raises ``DataError`` naming ``file:line`` (or is skipped and counted, per
    ``data.on_bad_record``)."""
    # No shift as in SFT: the head reads position last_index itself, so max_length positions.
    cache = {"kind": "reward", "options": {"attributes": list(attributes)}, "tokenizer": tokenizer}
    return common.tokenized_records(
        paths, lambda rec: validate_reward_record(rec, attributes),
        lambda record: tokenize_reward_example(tokenizer, record, attributes, data_cfg.max_length), data_cfg,
        cache if topology is not None else None, topology)


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
    """Masked MSE per attribute and overall, sharded across data-parallel ranks and summed exactly."""
    if not examples:
        return {}
    strategy.eval()
    sq_err = torch.zeros(len(attributes), dtype=torch.float64)
    entries = torch.zeros(len(attributes), dtype=torch.float64)
    for ids, chunk in common.sharded_batches(examples, micro_batch_size, topology):
        batch = common.to_device(collate_reward(chunk, pad_id), topology.device)
        scores = strategy.outputs(batch).double()
        if ids:
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


def setup(cfg: DictConfig, topology: Topology, tokenizer) -> Job:
    stage = cfg.stage
    attributes = list(stage.attributes)
    train_files, eval_files = common.data_files(cfg, topology, "reward")
    train, train_stats = common.train_examples(cfg, train_files, lambda files: tokenized_reward_dataset(
        files, tokenizer, cfg.data, attributes, topology))
    evals, _ = tokenized_reward_dataset(eval_files, tokenizer, cfg.data, attributes, topology)
    pad_id = tokenizer.pad_token_id

    def step(strategy, step: int, batches: list[dict]) -> tuple[dict, float]:
        entries, inputs = common.all_reduce_sums([sum(b["target_mask"].sum() for b in batches),
                                                  sum(b["attention_mask"].sum() for b in batches)], topology.dp_group)
        global_entries = torch.tensor(entries, dtype=torch.float32)
        info = strategy.train_step(
            batches, lambda scores, batch: micro_batch_loss(scores, batch, global_entries.to(scores.device)))
        loss = common.all_reduce_sum(info["loss"], topology.dp_group).item()
        return {**info, "loss": loss, "target_entries": int(entries)}, inputs

    def untrained(strategy) -> dict:
        """The starting model (a pure function of the config: seeded init or model.path) and the best
        constant predictor, the two bars the trained model is compared with."""
        if not evals:
            return {}
        metrics = evaluate(strategy, evals, pad_id, stage.micro_batch_size, topology, attributes,
                           "eval_mse_untrained")
        return {**metrics, **constant_predictor_mse(train, evals, attributes)}

    return Job(
        train=train, train_stats=train_stats, step=step, before=untrained,
        make_batch=lambda examples: collate_reward(examples, pad_id),
        # hf/ is RewardModel.save_pretrained: backbone + head + reward_config.json.
        make_model=lambda: build_reward_model(cfg.model, len(tokenizer), cfg.run.seed, attributes,
                                              stage.attribute_weights),
        evaluate=lambda strategy: evaluate(strategy, evals, pad_id, stage.micro_batch_size, topology, attributes),
        summary=lambda: {"attributes": attributes, "attribute_weights": list(stage.attribute_weights)})


def run(cfg: DictConfig, topology: Topology) -> dict:
    return loop.train(cfg, topology, setup)
