"""The training loop every training stage shares: setup, train, finish.

A stage module supplies a :class:`Job` — its data, its model, how one optimizer step computes its loss
and metrics, and its held-out evaluation — and :func:`train` does the rest the same way for every
algorithm: skip a stage that already completed, build the strategy, measure the starting model, resume
from a verified checkpoint, step through the global-batch plan (data order a pure function of
(seed, step), independent of the layout), count non-finite steps, checkpoint, honour stop signals,
evaluate, export.

Order matters in two places, for every stage alike:
- ``Job.before`` runs on the starting model before any checkpoint is loaded, so a resumed run reports
  the model the stage started from, not the checkpoint it resumed from;
- periodic evals (``stage.eval_every``) and the final eval run on every rank, with the same number of
  forwards per rank (:func:`trainer.stages.common.sharded_batches`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
from omegaconf import DictConfig

from trainer.data.sampler import GlobalBatchPlan
from trainer.parallel.topology import Topology
from trainer.stages import common

log = logging.getLogger(__name__)

Strategy = object  # trainer.parallel.strategy.Strategy; any object with its methods


@dataclass
class Job:
    """What one algorithm brings to the shared loop."""

    train: list[dict]  # tokenised training examples, indexed by the batch plan
    train_stats: dict  # what loading kept and dropped
    make_model: Callable[[], torch.nn.Module]  # built inside the strategy's model-init context
    make_batch: Callable[[list[dict]], dict[str, torch.Tensor]]  # examples -> one micro-batch
    # One optimizer step on this rank's micro-batches: (metrics reduced over data-parallel ranks, the
    # number of tokens this step processed on all ranks, for the throughput metric).
    step: Callable[[Strategy, int, list[dict]], tuple[dict, float]]
    evaluate: Callable[[Strategy], dict] = lambda strategy: {}  # held-out metrics; a collective
    before: Callable[[Strategy], dict] | None = None  # metrics of the starting model (see module doc)
    final: Callable[[Strategy], dict] | None = None  # extra end-of-stage metrics, e.g. generation accuracy
    summary: Callable[[], dict] = dict  # type-specific fields of the result
    on_strategy: Callable[[Strategy], Callable[[], None] | None] | None = None  # a hook; returns its undo
    throughput: str = "tokens_per_s"  # the metric name of step()'s token count per second
    logged: tuple[str, ...] = ("eval_",)  # result keys also written to metrics.jsonl at the last step


def train(cfg: DictConfig, topology: Topology, setup: Callable[[DictConfig, Topology, object], Job]) -> dict:
    """Run one training stage: ``setup(cfg, topology, tokenizer)`` builds its :class:`Job`. Collective."""
    stage = cfg.stage
    _, finished = common.start(cfg, topology)
    if finished is not None:
        return finished

    # ---- setup -----------------------------------------------------------------------------------
    tokenizer = common.build_tokenizer(cfg)
    job = setup(cfg, topology, tokenizer)
    log.info("train data: %s", job.train_stats)
    plan = GlobalBatchPlan(len(job.train), stage.global_batch_size, stage.micro_batch_size, topology.dp,
                           cfg.run.seed)
    total_steps = common.total_steps(stage, plan.steps_per_epoch)
    strategy = common.setup_strategy(cfg, topology, plan.grad_accum, total_steps, job.make_model)
    undo = job.on_strategy(strategy) if job.on_strategy is not None else None
    before = job.before(strategy) if job.before is not None else {}
    checkpoints, start_step, logger = common.restore(cfg, topology, strategy, total_steps)
    if start_step == 0 and before:
        logger.log(0, before)

    # ---- train -----------------------------------------------------------------------------------
    strategy.train()
    bad_steps = common.BadSteps(stage)
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        batches = [common.to_device(job.make_batch([job.train[i] for i in ids]), topology.device)
                   for ids in plan.micro_batches(step, topology.dp_rank)]
        metrics, tokens = job.step(strategy, step, batches)
        metrics[job.throughput] = tokens / (time.perf_counter() - t0)
        metrics["epoch"] = step // plan.steps_per_epoch
        done = step + 1
        if stage.eval_every and done % stage.eval_every == 0 and done < total_steps:
            metrics.update(job.evaluate(strategy))
        bad_steps.update(done, metrics, metrics)
        logger.log(done, metrics)
        common.after_step(cfg, topology, checkpoints, strategy, done, total_steps, bad_steps)

    # ---- finish ----------------------------------------------------------------------------------
    after = job.evaluate(strategy)
    if job.final is not None:
        after.update(job.final(strategy))
    result = {"stage": stage.name, "type": stage.type, "steps": total_steps, "train_data": job.train_stats,
              **job.summary(), **before, **after}
    final_metrics = {k: v for k, v in result.items() if k.startswith(job.logged)}
    if final_metrics:
        logger.log(total_steps, final_metrics)
    if undo is not None:
        undo()
    return common.finish(cfg, topology, strategy, checkpoints, tokenizer, logger, total_steps, result)
