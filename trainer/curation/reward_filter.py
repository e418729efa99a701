"""Reward-model filtering and judging (Nemotron-4 340B, Adler et al. 2024, §3.2.2–3.2.3).

The reward model is a reward stage's ``hf/`` export (`trainer.models.reward.load_reward_model`); a
response's reward is `RewardModel.reward` of its attribute scores, i.e. the attributes weighted as saved
with the model, read at the last token of ``prompt + response`` tokenised exactly as the reward stage
trained it (`tokenize_reward_example`, earliest turns cut first beyond ``max_length``; a response that
cannot fit is dropped and counted ``too_long``). Scoring runs in plain torch, eval mode, no_grad, in
batches of ``batch_size`` right-padded rows.

``mode=filter`` (chat records and prompt/response rows): keep a record when its reward is at least
``threshold`` and/or it is among the top ``top_fraction`` of the records that share its prompt
(ceil(fraction · n) of a group of n, so every prompt keeps at least one; ties keep input order). Kept
records carry their score as ``"reward"``.

``mode=judge`` (reward-model-as-judge, preference pairs and candidate sets): score every response; the
highest becomes ``chosen`` and the lowest ``rejected`` (first in input order on ties), with
``chosen_reward``/``rejected_reward`` set to the model's rewards — so an existing pair is re-ordered when
the model disagrees with it (counted ``reordered``). A set whose best and worst differ by no more than
``min_margin`` (default 0: a tie carries no preference) is dropped as ``no_margin``.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from trainer.curation.common import (Drops, Inputs, Result, bad_option, conversations, on_bad_record_option,
                                     option, prompt_id)
from trainer.curation.report import plot_histogram, quantiles

NAME = "reward-filter"
SUMMARY = "Nemotron reward filter: keep high-reward responses, or pick chosen/rejected by reward (judge)"
PLOT = "rewards.png"


@dataclass
class Options:
    reward_model: str = option(None, "reward model directory (a reward stage's hf/ export); required", type=str)
    mode: str = option("filter", "filter: keep high-reward responses; judge: choose chosen/rejected by reward",
                       choices=("filter", "judge"))
    threshold: float = option(None, "filter: keep records with reward >= this", type=float)
    top_fraction: float = option(None, "filter: keep the top fraction (0, 1] of each prompt's records", type=float)
    min_margin: float = option(0.0, "judge: drop sets whose best and worst rewards differ by <= this")
    max_length: int = option(2048, "tokens of prompt + response the reward model reads (earliest turns cut)")
    batch_size: int = option(8, "conversations scored per forward pass")
    device: str = option("cpu", "torch device to score on (cpu, cuda, cuda:1, ...)")
    examples: int = option(5, "dropped records quoted per reason in the report")
    plot: bool = option(True, f"write {PLOT} (the reward distribution)")
    on_bad_record: str = on_bad_record_option()


def kinds(options: Options) -> tuple[str, ...]:
    return ("chat", "row") if options.mode == "filter" else ("preference", "candidates")


def _check(options: Options) -> None:
    if not options.reward_model:
        raise bad_option(NAME, "reward_model", "is required: the reward model directory to score with")
    if options.mode == "filter" and options.threshold is None and options.top_fraction is None:
        raise bad_option(NAME, "threshold", "or --top-fraction (options.top_fraction) is required in filter mode")
    if options.top_fraction is not None and not 0 < options.top_fraction <= 1:
        raise bad_option(NAME, "top_fraction", f"must be in (0, 1], got {options.top_fraction}")
    for name in ("max_length", "batch_size"):
        if getattr(options, name) < 1:
            raise bad_option(NAME, name, f"must be positive, got {getattr(options, name)}")


def load(options: Options):
    """(model in eval mode on options.device, tokenizer) or BadInput naming --reward-model."""
    from trainer.data.tokenizer import load_tokenizer
    from trainer.models.reward import load_reward_model

    try:
        model = load_reward_model(options.reward_model).to(options.device).eval()
        tokenizer = load_tokenizer(options.reward_model)
    except (OSError, ValueError) as err:
        raise bad_option(NAME, "reward_model", f"cannot be loaded: {err}") from None
    return model, tokenizer


def score_conversations(model, tokenizer, convs: list[list[dict]], max_length: int, batch_size: int,
                        device: str = "cpu") -> list[float | None]:
    """The scalar reward of each conversation (its last turn the scored response); None if it cannot fit."""
    import torch

    from trainer.data.preference import collate_reward, tokenize_reward_example

    examples = [tokenize_reward_example(tokenizer, {"messages": c, "attributes": {}}, (), max_length) for c in convs]
    fits = [i for i, e in enumerate(examples) if e is not None]
    rewards: list[float | None] = [None] * len(convs)
    with torch.no_grad():
        for b in range(0, len(fits), batch_size):
            indices = fits[b:b + batch_size]
            batch = collate_reward([examples[i] for i in indices], tokenizer.pad_token_id)
            scores = model.scores({k: v.to(device) for k, v in batch.items()})
            for i, value in zip(indices, model.reward(scores).double().cpu().tolist()):
                rewards[i] = value
    return rewards


def _filter(inputs: Inputs, options: Options, rewards: list[float | None], drops: Drops) -> list[dict]:
    scored = [(i, r) for i, r in enumerate(rewards) if r is not None]
    allowed = {i for i, r in scored if options.threshold is None or r >= options.threshold}
    if options.top_fraction is not None:
        groups: dict[str, list[tuple[int, float]]] = {}
        for i, r in scored:
            groups.setdefault(prompt_id(inputs.rows[i].record), []).append((i, r))
        top = set()
        for members in groups.values():
            ranked = sorted(members, key=lambda m: -m[1])  # stable: ties keep input order
            top |= {i for i, _ in ranked[:math.ceil(options.top_fraction * len(members))]}
        allowed &= top
    kept = []
    for i, row in enumerate(inputs.rows):
        if rewards[i] is None:
            drops.add(row, "too_long", max_length=options.max_length)
        elif i not in allowed:
            drops.add(row, "low_reward", reward=round(rewards[i], 6))
        else:
            kept.append({**row.record, "reward": rewards[i]})
    return kept


def _judge(inputs: Inputs, options: Options, rewards: list[float | None], owners: list[tuple[int, int]],
           drops: Drops, counts: dict) -> list[dict]:
    per_record: dict[int, list[tuple[int, float | None]]] = {}
    for (k, j), r in zip(owners, rewards):
        per_record.setdefault(k, []).append((j, r))
    kept = []
    for k, row in enumerate(inputs.rows):
        scored = [(j, r) for j, r in per_record[k] if r is not None]
        if len(scored) < 2:
            drops.add(row, "too_long", max_length=options.max_length)
            continue
        best = max(scored, key=lambda s: s[1])  # max/min return the first of equal values
        worst = min(scored, key=lambda s: s[1])
        if best[1] - worst[1] <= options.min_margin:
            drops.add(row, "no_margin", best=round(best[1], 6), worst=round(worst[1], 6))
            continue
        rec = row.record
        responses = [rec["chosen"], rec["rejected"]] if row.kind == "preference" else rec["responses"]
        out = {key: value for key, value in rec.items() if key not in ("responses", "chosen", "rejected")}
        out.update(chosen=responses[best[0]], rejected=responses[worst[0]], chosen_reward=best[1],
                   rejected_reward=worst[1])
        if row.kind == "preference" and best[0] == 1:  # the model prefers the pair's rejected side
            counts["reordered"] += 1
        kept.append(out)
    return kept


def run(inputs: Inputs, options: Options, output_dir: Path) -> Result:
    _check(options)
    model, tokenizer = load(options)
    convs, owners = [], []
    for k, row in enumerate(inputs.rows):
        for j, conv in enumerate(conversations(row.record)):
            convs.append(conv)
            owners.append((k, j))
    rewards = score_conversations(model, tokenizer, convs, options.max_length, options.batch_size, options.device)
    drops = Drops(options.examples)
    counts = {"reordered": 0}
    if options.mode == "filter":
        kept = _filter(inputs, options, rewards, drops)
        kept_rewards = [r["reward"] for r in kept]
    else:
        kept = _judge(inputs, options, rewards, owners, drops, counts)
        kept_rewards = [r[key] for r in kept for key in ("chosen_reward", "rejected_reward")]
    scored = [r for r in rewards if r is not None]
    report = {"mode": options.mode, "reward_model": options.reward_model, "attributes": model.attributes,
              "attribute_weights": model.attribute_weights, "scored_responses": len(scored),
              "dropped": dict(drops.counts), "rewards": quantiles(scored), "kept_rewards": quantiles(kept_rewards),
              "examples": drops.examples}
    if options.mode == "judge":
        report["reordered"] = counts["reordered"]
        margins = [r["chosen_reward"] - r["rejected_reward"] for r in kept]
        report["mean_margin"] = statistics.fmean(margins) if margins else None
    plots = []
    if options.plot and scored:
        marks = {} if options.threshold is None or options.mode != "filter" else {"threshold": options.threshold}
        plot_histogram(output_dir / PLOT, {"all responses": scored, "kept": kept_rewards}, "reward", marks)
        plots.append(PLOT)
    lines = [f"Reward model `{options.reward_model}`: attributes "
             + ", ".join(f"{a}×{w:g}" for a, w in zip(model.attributes, model.attribute_weights)), "",
             f"- scored responses: {len(scored)}; dropped: "
             + (", ".join(f"{k} {v}" for k, v in drops.counts.items()) or "none")]
    if options.mode == "judge":
        lines.append(f"- pairs re-ordered by the model: {counts['reordered']}")
    for reason, examples in drops.examples.items():
        lines += ["", f"### Dropped: {reason}", ""]
        lines += [f"- `{e['where']}`: " + ", ".join(f"{k} {v}" for k, v in e.items() if k != "where")
                  for e in examples]
    summary = (f"{NAME} ({options.mode}): {len(inputs.rows)} records, {len(scored)} responses scored, "
               f"{len(kept)} kept" + (f", {counts['reordered']} pairs re-ordered" if options.mode == "judge" else ""))
    return Result(kept, report, summary, lines, plots)
