"""The evaluation a recipe runs after every stage, on the stage's exported model.

Each recipe eval source is measured on its held-out split: greedy-generation accuracy per task family
for chat sources (or LongWriter's length score, for the sources in ``recipe.eval.length_following``),
chosen-vs-rejected ranking accuracy for preference sources, and mean response
length; a reward model's export is measured on how it ranks the preference sources' held-out pairs. The exported HF model runs in plain torch on every rank, prompts sharded over data-parallel
ranks (fine for the models a recipe's per-stage eval is meant for; large runs set recipe.eval.enabled=false
and rely on the stages' own sharded evals).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM

from trainer.data.preference import tokenize_pair
from trainer.data.records import read_jsonl
from trainer.data.tokenizer import load_tokenizer
from trainer.evaluation.length_following import score_record
from trainer.losses import token_logps
from trainer.parallel.topology import Topology
from trainer.models.reward import load_reward_model
from trainer.stages.annotate import score_pairs
from trainer.stages.common import all_reduce_sum, sharded_batches
from trainer.stages.evaluation import generation_accuracy
from trainer.stages.reference import pair_logps_table, ranking_metrics


class HFRunner:
    """The slice of the Strategy interface evaluation needs, over a plain transformers model."""

    def __init__(self, model: torch.nn.Module):
        self.module = model.eval()

    def eval(self) -> None:
        self.module.eval()

    def train(self) -> None:  # an evaluation-only runner stays in eval mode
        self.module.eval()

    def token_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             use_cache=False).logits
        return token_logps(logits, batch["labels"])

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id: int | list[int],
                 pad_token_id) -> torch.Tensor:
        """Greedy continuation, [B, prompt + new]; a row ends at any of the ``eos_token_id`` ids."""
        return self.module.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                    max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                    pad_token_id=pad_token_id, use_cache=True)


@torch.no_grad()
def evaluate_model(hf_dir: Path, sources: dict[str, tuple[str, list[Path]]], eval_cfg: DictConfig,
                   max_length: int, topology: Topology) -> dict[str, float]:
    """``sources``: name -> (kind, eval files). Metrics are prefixed ``<source>/``. A collective."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32)
    runner = HFRunner(model.to(topology.device))
    tokenizer = load_tokenizer(str(hf_dir))
    metrics: dict[str, float] = {}
    for name, (kind, files) in sources.items():
        records = [r for path in files for r in read_jsonl(path, lambda r: None)[0]]
        if name in eval_cfg.length_following:
            found = length_following(runner.module, tokenizer, records, eval_cfg.length_max_new_tokens, topology)
        elif kind == "sft":
            found = generation_accuracy(runner, records, tokenizer, topology, eval_cfg.max_new_tokens,
                                        eval_cfg.batch_size)
        else:
            pairs = [p for p in (tokenize_pair(tokenizer, r, max_length + 1) for r in records) if p is not None]
            table, _ = pair_logps_table(runner, pairs, tokenizer.pad_token_id, eval_cfg.batch_size, topology)
            found = {k.removeprefix("eval_"): v for k, v in ranking_metrics(table).items()}
        metrics.update({f"{name}/{k}": v for k, v in found.items()})
    return metrics


def length_following(model, tokenizer, records: list[dict], max_new_tokens: int, topology: Topology) -> dict:
    """LongWriter's S_l of greedy generations (trainer/evaluation/length_following.py) over the records
    that ask for a length, one prompt at a time on each data-parallel rank's share: ``length_score``
    (mean S_l, 0-100), ``length_ratio`` (mean produced / required) and ``length_scored``. A collective."""
    sums = torch.zeros(3, dtype=torch.float64)  # [S_l, produced / required, scored]
    for ids, chunk in sharded_batches(records, 1, topology):
        item = score_record(model, tokenizer, chunk[0], max_new_tokens)
        if ids and item is not None:
            sums += torch.tensor([item["score"], item["produced"] / item["required"], 1.0], dtype=torch.float64)
    sums = all_reduce_sum(sums, topology.dp_group)
    n = max(1.0, sums[2].item())
    return {"length_score": sums[0].item() / n, "length_ratio": sums[1].item() / n, "length_scored": int(sums[2])}


@torch.no_grad()
def evaluate_reward_model(hf_dir: Path, sources: dict[str, tuple[str, list[Path]]], eval_cfg: DictConfig,
                          max_length: int, topology: Topology) -> dict[str, float]:
    """A reward model's ``<source>/rm_accuracy`` on every preference source's held-out pairs: how often
    its scalar reward (the weighted attribute sum it was saved with) puts the chosen response above the
    rejected one. 0.5 is chance. Pairs a side of which does not fit ``max_length`` are left out. A
    collective."""
    model = load_reward_model(str(hf_dir)).to(topology.device).eval()
    tokenizer = load_tokenizer(str(hf_dir))
    metrics: dict[str, float] = {}
    for name, (kind, files) in sources.items():
        if kind != "preference":
            continue
        records = [r for path in files for r in read_jsonl(path, lambda r: None)[0]]
        counts = torch.zeros(2, dtype=torch.float64)  # [chosen above rejected, scored pairs]
        for ids, chunk in sharded_batches(records, eval_cfg.batch_size, topology):
            scored = [s for s in score_pairs(model, tokenizer, chunk, max_length, topology.device)[:len(ids)]
                      if s is not None]
            counts += torch.tensor([sum(c > r for c, r in scored), len(scored)], dtype=torch.float64)
        counts = all_reduce_sum(counts, topology.dp_group)
        if counts[1] > 0:
            metrics[f"{name}/rm_accuracy"] = (counts[0] / counts[1]).item()
    return metrics
