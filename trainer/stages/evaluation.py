"""Held-out evaluation shared by the stages: greedy-generation accuracy per task family.

A response is correct when the family's verifier accepts it (the synthetic tasks, see
``trainer.data.synthetic.verify``) or, for records of no known family, when it equals the reference
answer exactly. Prompts are sharded over data-parallel ranks and the counts summed, so the numbers do
not depend on the layout.
"""

from __future__ import annotations

import torch

from trainer.data.chat import tokenize_prompt
from trainer.data.synthetic import TASK_FAMILIES, verify
from trainer.parallel.topology import Topology
from trainer.stages.common import all_reduce_sum, sharded_batches


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def stop_token_ids(tokenizer, module: torch.nn.Module) -> list[int]:
    """The ids greedy generation stops at: the tokenizer's eos and every eos id of the model's
    ``generation_config.json``. Phi-3 and Llama-3 list several there (end of turn, end of text) and
    end a chat turn with one that is not the tokenizer's eos; stopping at that one alone would run
    every response to the token limit. A generation config transformers derived from ``config.json``
    (a model built from config, or a checkpoint without the file) adds nothing: its default eos
    belongs to no tokenizer of ours."""
    ids = [tokenizer.eos_token_id]
    config = getattr(module, "generation_config", None)  # absent on non-generative modules
    if config is not None and not getattr(config, "_from_model_config", False):
        extra = config.eos_token_id
        ids += [] if extra is None else [extra] if isinstance(extra, int) else list(extra)
    return list(dict.fromkeys(i for i in ids if i is not None))


def cut_at_stop(row: list[int], stop_ids: list[int]) -> list[int]:
    """``row`` up to (without) its first stop token: the response the model gave."""
    for t, token in enumerate(row):
        if token in stop_ids:
            return row[:t]
    return row


def _is_correct(record: dict, response: str) -> bool:
    family = record.get("family")
    prompt = record["messages"][-2]["content"]
    if family in TASK_FAMILIES:
        return verify(family, prompt, response)
    return response.strip() == record["messages"][-1]["content"].strip()


@torch.no_grad()
def generation_accuracy(strategy, records: list[dict], tokenizer, topology: Topology, max_new_tokens: int,
                        batch_size: int) -> dict[str, float]:
    """``accuracy`` overall and ``accuracy/<family>``, plus mean generated tokens, over ``records``
    (chat records whose last message is the reference assistant answer). A collective."""
    families = sorted({r.get("family") or "other" for r in records})
    correct = torch.zeros(len(families), dtype=torch.float64)
    total = torch.zeros(len(families), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    stops, pad = stop_token_ids(tokenizer, strategy.module), tokenizer.pad_token_id
    strategy.eval()
    for ids, chunk in sharded_batches(records, batch_size, topology):
        prompt_ids, mask = _left_pad([tokenize_prompt(tokenizer, r["messages"][:-1]) for r in chunk], pad)
        out = strategy.generate(prompt_ids.to(topology.device), mask.to(topology.device), max_new_tokens, stops, pad)
        for record, row in zip(chunk[:len(ids)], out[:, prompt_ids.shape[1]:].cpu().tolist()):
            row = cut_at_stop(row, stops)
            response = tokenizer.decode(row, skip_special_tokens=True)
            k = families.index(record.get("family") or "other")
            correct[k] += float(_is_correct(record, response))
            total[k] += 1
            tokens += len(row)
    strategy.train()
    correct = all_reduce_sum(correct, topology.dp_group)
    total = all_reduce_sum(total, topology.dp_group)
    tokens = all_reduce_sum(tokens, topology.dp_group)
    metrics = {f"accuracy/{f}": (correct[k] / total[k]).item() for k, f in enumerate(families) if total[k] > 0}
    metrics["accuracy"] = (correct.sum() / total.sum().clamp(min=1)).item()
    metrics["response_tokens"] = (tokens / total.sum().clamp(min=1)).item()
    return metrics
