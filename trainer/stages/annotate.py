"""Annotate preference pairs with a reward model's scalar rewards (for RPO): one readable loop.

Each pair's ``chosen_reward`` / ``rejected_reward`` become the reward model's scalar reward
(:meth:`RewardModel.reward`, the attribute scores weighted as saved with the model) of
``prompt + chosen`` / ``prompt + rejected``, read at the conversation's last token exactly as the
reward stage trained it (:func:`tokenize_reward_example`, ``data.max_length``). A pair that arrives with
both rewards (ground truth, e.g. a verifier's) keeps them unless ``stage.overwrite_rewards``; a side
that cannot fit ``data.max_length`` leaves its pair unscored (counted as ``too_long``).

Layout: every rank holds a whole replica of the reward model and scores indices ``rank::world`` in
batches of ``stage.micro_batch_size``, in plain torch (eval mode, no_grad, float32): no DeepSpeed.
Reward models too big for one device (ZeRO-3 / tensor-parallel inference) are out of scope here.

Resumable: each rank appends ``{"index", "chosen_reward", "rejected_reward"}`` lines to
``<stage dir>/parts/rank<r>-of-<world>.jsonl``, flushed after every batch. A rerun skips every index
found in any part file (so also after a change of world size) and drops a torn last line; rank 0
then merges the parts with the input, in input order and with every other field preserved, into
``stage.output`` (default ``<stage dir>/annotated.jsonl``) through a temporary file and ``os.replace``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from trainer.data.preference import (collate_reward, preference_messages, tokenize_reward_example,
                                     validate_preference_record)
from trainer.data.records import read_jsonl
from trainer.data.tokenizer import load_tokenizer
from trainer.models.reward import RewardModel, load_reward_model
from trainer.parallel.topology import Topology
from trainer.runtime import signals
from trainer.runtime.errors import Preempted
from trainer.stages import common

log = logging.getLogger(__name__)
REWARDS = ("chosen_reward", "rejected_reward")
# Result fields a recipe reports as the stage's numbers: the share of scored pairs whose chosen
# response the reward model puts above the rejected one, and how often its ordering agrees with the
# rewards the pairs arrived with (where they had distinct ones, e.g. a verifier's).
ANNOTATE_METRICS = ("chosen_above_rejected", "agreement_with_input", "scored")


def read_part(path: Path) -> dict[int, dict]:
    """index -> its part record. A last line without its newline was torn by a kill and is ignored;
    any other unreadable line is corruption and an error naming file and line."""
    done: dict[int, dict] = {}
    if not path.is_file():
        return done
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.endswith("\n"):
                break
            try:
                record = json.loads(line)
                done[int(record["index"])] = record
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: unreadable annotation part record: {e}") from None
    return done


def open_part(path: Path):
    """Open this rank's part file for appending, first cutting a torn last line (else the next record
    would be glued onto it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")


def reward_example(tokenizer, prompt: list[dict], response: list[dict], max_length: int) -> dict | None:
    """``prompt + response`` tokenised as the reward stage tokenised its training conversations."""
    return tokenize_reward_example(tokenizer, {"messages": prompt + response, "attributes": {}}, (), max_length)


@torch.no_grad()
def score_pairs(model: RewardModel, tokenizer, records: list[dict], max_length: int,
                device: torch.device, one_row: bool = True) -> list[tuple[float, float] | None]:
    """(chosen reward, rejected reward) of each record; None where a side does not fit ``max_length``.
    ``one_row``: the sides without padding in one row (:meth:`RewardModel.scores`)."""
    sides, owners = [], []
    for k, record in enumerate(records):
        prompt, chosen, rejected = preference_messages(record)
        pair = [reward_example(tokenizer, prompt, response, max_length) for response in (chosen, rejected)]
        if None not in pair:
            sides += pair
            owners.append(k)
    results: list[tuple[float, float] | None] = [None] * len(records)
    if sides:
        batch = common.to_device(collate_reward(sides, tokenizer.pad_token_id), device)
        rewards = model.reward(model.scores(batch, one_row))
        rewards = rewards.double().cpu().tolist()
        for j, k in enumerate(owners):
            results[k] = (rewards[2 * j], rewards[2 * j + 1])
    return results


def _input_records(cfg: DictConfig, topology: Topology) -> list[dict]:
    if cfg.data.train:
        paths = [Path(p) for p in cfg.data.train]
    else:  # the synthetic demo pairs (they carry verifier rewards: see docs/reward.md)
        paths = common.data_files(cfg, topology, "preference")[0]
    return [r for path in paths for r in read_jsonl(path, validate_preference_record, cfg.data.on_bad_record)[0]]


def merge(records: list[dict], keep: list[bool], parts_dir: Path, output: Path) -> dict[str, int]:
    """Write ``records`` with the rewards of every part file (except where ``keep``) to ``output``
    atomically; the counts."""
    scored: dict[int, dict] = {}
    for part in sorted(parts_dir.glob("rank*-of-*.jsonl")):
        scored.update(read_part(part))
    counts = {"scored": 0, "too_long": 0}
    above = compared = agreed = 0
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for index, record in enumerate(records):
            part = None if keep[index] else scored.get(index)
            if part is not None and part["chosen_reward"] is not None:
                gap = part["chosen_reward"] - part["rejected_reward"]
                above += gap > 0
                given = [record.get(key) for key in REWARDS]
                if None not in given and given[0] != given[1]:
                    compared += 1
                    agreed += (gap > 0) == (given[0] > given[1])
                record = {**record, **{key: part[key] for key in REWARDS}}
                counts["scored"] += 1
            elif part is not None:
                counts["too_long"] += 1
            f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, output)
    if counts["scored"]:
        counts["chosen_above_rejected"] = above / counts["scored"]
    if compared:
        counts["agreement_with_input"] = agreed / compared
    return counts


def run(cfg: DictConfig, topology: Topology) -> dict:
    stage = cfg.stage
    out, finished = common.start(cfg, topology)
    if finished is not None:
        return finished

    # ---- setup -----------------------------------------------------------------------------------
    records = _input_records(cfg, topology)
    keep = [not stage.overwrite_rewards and all(r.get(key) is not None for key in REWARDS) for r in records]
    model = load_reward_model(stage.reward_model).to(topology.device).eval()
    tokenizer = load_tokenizer(stage.reward_model)
    parts_dir = out / "parts"
    mine = [i for i in range(topology.rank, len(records), topology.world_size) if not keep[i]]
    # Finished indices of any earlier attempt, whatever its world size.
    done: set[int] = set()
    for part in parts_dir.glob("rank*-of-*.jsonl"):
        done |= set(read_part(part))
    todo = [i for i in mine if i not in done]
    log.info("annotate: %d pairs, %d keep their rewards; rank %d scores %d (%d already done)",
             len(records), sum(keep), topology.rank, len(todo), len(mine) - len(todo))

    # ---- score -----------------------------------------------------------------------------------
    size = stage.micro_batch_size
    with open_part(parts_dir / f"rank{topology.rank}-of-{topology.world_size}.jsonl") as part:
        for b in range(0, len(todo), size):
            indices = todo[b:b + size]
            results = score_pairs(model, tokenizer, [records[i] for i in indices], cfg.data.max_length,
                                  topology.device, cfg.parallel.segment_attention)
            for index, result in zip(indices, results):
                chosen, rejected = result if result is not None else (None, None)
                part.write(json.dumps({"index": index, "chosen_reward": chosen, "rejected_reward": rejected}) + "\n")
            part.flush()
            common.maybe_inject_fault(b // size + 1)
            # Ranks score different counts with no collective between batches, so each stops on its
            # own signal here; what it scored is on disk and a rerun skips it.
            if signals.requested():
                break
    scored_now = common.all_reduce_sum(torch.tensor(float(len(todo))), None)
    if signals.agreed(topology.world_size, topology.device):
        why = signals.requested() or "a stop signal on another rank"
        raise Preempted(f"stage {stage.name} stopped by {why}; the pairs scored so far are kept in {parts_dir}. "
                        "Rerun the same command to resume")
    topology.barrier()

    # ---- merge -----------------------------------------------------------------------------------
    output = Path(stage.output) if stage.output else out / "annotated.jsonl"
    result = {"stage": stage.name, "type": "annotate", "records": len(records), "kept": sum(keep),
              "scored_this_run": int(scored_now.item()), "output": str(output)}
    if topology.is_main:
        result.update(merge(records, keep, parts_dir, output))
        result["scored_before"] = result["scored"] + result["too_long"] - result["scored_this_run"]
        common.write_stage_result(out, result)
    topology.barrier()
    return result
