"""Preference optimisation: DPO, IPO and Nemotron-4's RPO, with an optional SFT term on the chosen side.

    L = preference_weight * mean_pairs(L_pref) + sft_weight * mean_pairs(NLL(chosen))

over the GLOBAL batch of pairs: each micro-batch contributes ``sum over its pairs / global pairs``, so
the update does not depend on how pairs are split over ranks and micro-batches. Chosen and rejected of
every pair go through the model in one forward (rows c_0..c_{n-1}, r_0..r_{n-1}, or packed rows).

The reference model's log-probs come from the on-disk cache (trainer.stages.reference), computed in one
sharded pass before training when missing; ``stage.reference_mode=online`` keeps the reference model
and runs it on every micro-batch instead.
"""

from __future__ import annotations

import functools
import gc
import logging
from pathlib import Path
from typing import Callable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from trainer.data.packing import pack_pairs
from trainer.data.preference import collate_pairs, tokenize_pair, validate_preference_record
from trainer.losses import dpo_loss, ipo_loss, preference_loss, preference_metrics, rpo_loss
from trainer.models import build_model
from trainer.data.prefix_sharing import share_pairs
from trainer.config.validate import resolve_layout
from trainer.parallel.strategy import build_strategy
from trainer.parallel.topology import Topology
from trainer.data.records import DataError
from trainer.stages import common, loop, reference
from trainer.stages.loop import Job

log = logging.getLogger(__name__)

# Per-pair preference losses by name; each takes (pi_c, pi_r, ref_c, ref_r, batch, stage).
PREFERENCE_LOSSES = {
    "dpo": lambda pi_c, pi_r, ref_c, ref_r, batch, s: dpo_loss(pi_c, pi_r, ref_c, ref_r, s.beta),
    "ipo": lambda pi_c, pi_r, ref_c, ref_r, batch, s: ipo_loss(pi_c, pi_r, ref_c, ref_r, s.beta),
    "rpo": lambda pi_c, pi_r, ref_c, ref_r, batch, s: rpo_loss(
        pi_c, pi_r, ref_c, ref_r, batch["chosen_reward"], batch["rejected_reward"], s.beta, s.eta,
        s.rpo_distance),
}
METRICS = ("pref_loss", "sft_loss", "reward_accuracy", "margin", "reward_chosen", "reward_rejected",
           "logps_chosen", "logps_rejected", "target_gap")


def micro_batch_loss(logps: torch.Tensor, batch: dict, stage: DictConfig, global_pairs: int,
                     sums: dict[str, torch.Tensor]) -> torch.Tensor:
    """This micro-batch's share of the global-batch loss; adds its per-pair metric sums to ``sums``."""
    pi_c, pi_r, _, _ = reference.pair_logps(logps, batch, stage.average_logps)
    ref_c, ref_r = batch["ref_chosen"].to(pi_c.dtype), batch["ref_rejected"].to(pi_c.dtype)
    pref = PREFERENCE_LOSSES[stage.loss](pi_c, pi_r, ref_c, ref_r, batch, stage)
    sft_nll = -pi_c  # NLL of the chosen response, summed or averaged over its tokens like the log-probs
    n = pi_c.shape[0]
    share = preference_loss(pref, sft_nll, stage.preference_weight, stage.sft_weight) * (n / global_pairs)
    with torch.no_grad():
        parts = preference_metrics(pi_c, pi_r, ref_c, ref_r, stage.beta)
        parts["reward_accuracy"] = parts.pop("accuracy")
        parts.update(pref_loss=pref, sft_loss=sft_nll, logps_chosen=pi_c, logps_rejected=pi_r)
        if stage.loss == "rpo":  # every pair carries rewards (checked at load), on every rank
            parts["target_gap"] = stage.eta * (batch["chosen_reward"] - batch["rejected_reward"])
        for key, value in parts.items():
            sums[key] = sums.get(key, 0) + value.detach().double().sum().cpu()
    return share


def _load_pairs(files: list[Path], tokenizer, cfg: DictConfig, topology: Topology,
                train: bool) -> tuple[Sequence[dict], dict]:
    """Tokenised pairs of ``files``. RPO's training pairs must all carry rewards; its eval pairs need
    none (held-out evaluation ranks responses, it does not use rewards)."""
    pairs, stats = common.tokenized_records(files, validate_preference_record, lambda record: tokenize_pair(
        tokenizer, record, cfg.data.max_length + 1, cfg.data.truncation), cfg.data,
        {"kind": "preference", "tokenizer": tokenizer}, topology)
    if train and cfg.stage.loss == "rpo":
        missing = sum(p["chosen_reward"] is None for p in pairs)
        if missing:
            raise DataError(f"stage.loss=rpo needs chosen_reward / rejected_reward on every training pair; "
                            f"{missing} of {len(pairs)} pairs in {', '.join(map(str, files))} have none (score "
                            "them with stage=annotate, or in a recipe give the RPO stage reward_model: <reward stage>)")
    return pairs, stats


def _reference_model_cfg(cfg: DictConfig) -> DictConfig:
    model = OmegaConf.to_container(cfg.model, resolve=True)
    if cfg.stage.reference is not None:
        model["path"] = cfg.stage.reference
    return OmegaConf.create(model)


def _reference_strategy(cfg: DictConfig, topology: Topology, vocab_size: int):
    ref_cfg = _reference_model_cfg(cfg)
    strategy = build_strategy(cfg.parallel, topology)
    with strategy.model_init_context(cfg.stage.micro_batch_size, 1, ref_cfg.path is not None):
        model = build_model(ref_cfg, vocab_size, cfg.run.seed)
    strategy.setup_inference(model, cfg.stage.micro_batch_size)
    return strategy


def _cached_reference(cfg: DictConfig, topology: Topology, tokenizer, splits: dict[str, tuple[list, list[Path]]]
                      ) -> tuple[int, dict[str, torch.Tensor]]:
    """Cached reference log-probs of every split's pairs, computing missing tables in one pass. Returns
    the number of pairs this run forwarded through the reference (all ranks) and the [N, 4] tables."""
    ref_cfg = _reference_model_cfg(cfg)
    cache_dir = Path(cfg.data.cache_dir)
    model_key = reference.model_fingerprint(ref_cfg, len(tokenizer), cfg.run.seed, cache_dir)
    tok_key = reference.tokenizer_fingerprint(tokenizer)
    paths = {name: reference.cache_path(files, model_key, tok_key, cfg.data) for name, (_, files) in splits.items()}
    # Rank 0 reads the cache and hands its tables to every rank, so all ranks agree on what is missing
    # (the reference forward below is a collective) even where other nodes do not share its disk.
    found = common.from_main({name: reference.load_table(paths[name], len(pairs))
                              for name, (pairs, _) in splits.items()} if topology.is_main else None, topology)
    tables = {name: (paths[name], found[name]) for name in splits}  # split -> (cache path, [N, 4] table or None)
    missing = [name for name in splits if found[name] is None]
    forwarded = torch.zeros((), dtype=torch.float64)
    if missing:
        strategy = _reference_strategy(cfg, topology, len(tokenizer))
        for name in missing:
            path = tables[name][0]
            table, count = reference.pair_logps_table(strategy, splits[name][0], tokenizer.pad_token_id,
                                                      cfg.stage.micro_batch_size, topology,
                                                      pair_batcher(cfg, tokenizer.pad_token_id))
            forwarded += count
            if topology.is_main:
                reference.save_table(path, table)
                log.info("reference log-probs for %s cached in %s", name, path)
            tables[name] = (path, table)
        del strategy
        gc.collect()
    forwarded = int(common.all_reduce_sum(forwarded, topology.dp_group).item())
    return forwarded, {name: table for name, (_, table) in tables.items()}


def evaluate(strategy, pairs: list[dict], ref_table: torch.Tensor | None, make_batch: Callable, stage: DictConfig,
             topology: Topology) -> dict:
    """Held-out pairs: ranking accuracy of the policy alone, implicit-reward accuracy and margin
    (summed log-probs, unscaled by beta) against the reference."""
    if not pairs:
        return {}
    strategy.eval()
    table, _ = reference.pair_logps_table(strategy, pairs, 0, stage.micro_batch_size, topology, make_batch)
    strategy.train()
    return reference.ranking_metrics(table, ref_table)


def pair_batcher(cfg: DictConfig, pad_id: int) -> Callable[[list[dict]], dict]:
    """pairs -> one micro-batch in the stage's layout (trainer.config.validate.resolve_layout): prompt
    shared (several pairs per row when packing), packed, or padded rows c_0..c_{n-1}, r_0..r_{n-1}.
    The same for the policy, the cached and the online reference, and evaluation."""
    layout = resolve_layout(cfg)
    if layout["prefix_sharing"]:
        return functools.partial(share_pairs, max_length=cfg.data.max_length, pad_id=pad_id, pack=layout["packing"])
    if layout["packing"]:
        return functools.partial(pack_pairs, max_length=cfg.data.max_length, pad_id=pad_id)
    return functools.partial(collate_pairs, pad_id=pad_id)


def setup(cfg: DictConfig, topology: Topology, tokenizer) -> Job:
    stage = cfg.stage
    pad_id = tokenizer.pad_token_id
    make_batch = pair_batcher(cfg, pad_id)
    train_files, eval_files = common.data_files(cfg, topology, "preference")
    train, train_stats = common.train_examples(cfg, train_files, lambda files: _load_pairs(
        files, tokenizer, cfg, topology, train=True))
    evals, _ = _load_pairs(eval_files, tokenizer, cfg, topology, train=False) if eval_files else ([], {})
    splits = {"train": (train, train_files), **({"eval": (evals, eval_files)} if evals else {})}
    online = stage.reference_mode == "online"
    ref_forwards, ref_eval, ref_strategy = [0], None, None
    if online:
        ref_strategy = _reference_strategy(cfg, topology, len(tokenizer))
        if evals:
            ref_eval, count = reference.pair_logps_table(ref_strategy, evals, pad_id, stage.micro_batch_size,
                                                         topology, make_batch)
            ref_forwards[0] = int(common.all_reduce_sum(torch.tensor(float(count)), topology.dp_group).item())
    else:
        ref_forwards[0], tables = _cached_reference(cfg, topology, tokenizer, splits)
        train = reference.attach(train, tables["train"], stage.average_logps)
        ref_eval = tables.get("eval")
    # The same metric keys on every rank; under pipeline parallelism only the last stage ran the loss.
    keys = [key for key in METRICS if key != "target_gap" or stage.loss == "rpo"]

    def step(strategy, step: int, batches: list[dict]) -> tuple[dict, float]:
        if online:
            with torch.no_grad():
                for batch in batches:
                    batch["ref_chosen"], batch["ref_rejected"], _, _ = reference.pair_logps(
                        ref_strategy.token_logps(batch), batch, stage.average_logps)
                    ref_forwards[0] += batch["ref_chosen"].shape[0] * topology.dp
        sums: dict[str, torch.Tensor] = {}
        info = strategy.train_step(batches, lambda logps, batch: micro_batch_loss(
            logps, batch, stage, stage.global_batch_size, sums))
        zero = torch.zeros((), dtype=torch.float64)
        local = strategy.from_last_stage(torch.stack([sums.get(key, zero) for key in keys]))
        *totals, tokens, loss = common.all_reduce_sums(
            [*local, sum(b["loss_mask"].sum() for b in batches), info["loss"]], topology.dp_group)
        metrics = {key: total / stage.global_batch_size for key, total in zip(keys, totals)}
        return {**metrics, **info, "loss": loss}, tokens

    def held_out(strategy) -> dict:
        return evaluate(strategy, evals, ref_eval, make_batch, stage, topology)

    return Job(
        train=train, train_stats=train_stats, step=step, evaluate=held_out,
        before=lambda strategy: {f"before_{k}": v for k, v in held_out(strategy).items()},
        make_model=lambda: build_model(cfg.model, len(tokenizer), cfg.run.seed),
        make_batch=make_batch,
        summary=lambda: {"loss": stage.loss, "reference_forward_pairs": ref_forwards[0]},
        throughput="response_tokens_per_s")


def run(cfg: DictConfig, topology: Topology) -> dict:
    return loop.train(cfg, topology, setup)
