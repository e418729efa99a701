"""Reference-model log-probabilities for preference stages: computed once, cached on disk, reused.

Before a DPO/IPO/RPO stage trains, the reference model runs one forward pass over the preference data,
sharded across data-parallel ranks; the per-pair response log-probs (sums and token counts) are
summed into a full table on every rank and stored in ``data.cache_dir`` under a key of (reference model
fingerprint, data bytes, tokenizer, max length, truncation). Later epochs, resumed runs and later runs
on the same data read the table and never build the reference model at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from collections.abc import Sequence as SequenceABC
from typing import Callable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from trainer.data.packing import segment_sum
from trainer.data.preference import collate_pairs
from trainer.data.sources import data_files_of
from trainer.parallel.topology import Topology
from trainer.runtime.identity import file_hash
from trainer.stages.common import all_reduce_sum, sharded_batches, to_device

log = logging.getLogger(__name__)
CACHE_VERSION = 1


def _sha256_file(path: Path, cache_dir: Path) -> str:
    """Content hash of a (possibly huge) weight file, memoised by (path, size, mtime)."""
    stat = path.stat()
    memo_key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    memo = cache_dir / "file-hashes" / memo_key
    if memo.is_file():
        return memo.read_text()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
    tmp.write_text(digest.hexdigest())
    os.replace(tmp, memo)
    return digest.hexdigest()


def model_fingerprint(model_cfg: DictConfig, vocab_size: int, seed: int, cache_dir: Path) -> str:
    """Identifies the reference weights: the files of a local checkpoint, or (arch, config, vocab,
    seed) for a model built from config, whose seeded init is deterministic."""
    if model_cfg.path is None:
        spec = {"arch": model_cfg.arch, "config": OmegaConf.to_container(model_cfg.config, resolve=True),
                "vocab_size": vocab_size, "seed": seed}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    root = Path(model_cfg.path)
    parts = [(p.name, _sha256_file(p, cache_dir)) for p in sorted(root.iterdir())
             if p.suffix in (".safetensors", ".bin", ".json") and p.is_file()]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    backend = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else str(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256((backend + str(tokenizer.chat_template)).encode()).hexdigest()


def cache_path(data_files: list[Path], model_key: str, tokenizer_key: str, data_cfg: DictConfig) -> Path:
    """Where the table for this (model, tokenizer, data bytes, length settings) lives: under
    ``data.cache_dir``, shared by every run on this machine, never next to the user's data (which may
    be a read-only mount)."""
    data = [file_hash(f) for path in data_files for f in data_files_of(path)]
    parts = {"v": CACHE_VERSION, "model": model_key, "tokenizer": tokenizer_key, "data": data,
             "max_length": data_cfg.max_length, "truncation": data_cfg.truncation}
    if data_cfg.get("mix"):  # the table's rows follow the mix's order (trainer/data/mixing.py)
        parts["mix"] = [[len(s.train), s.weight, s.max_samples] for s in data_cfg.mix] + [data_cfg.mix_seed]
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]
    return Path(data_cfg.cache_dir) / "reference" / f"reflogps-{key}.pt"


def pair_logps(logps: torch.Tensor, batch: dict[str, torch.Tensor], average: bool) -> tuple[torch.Tensor, ...]:
    """Per-pair response log-probs (chosen [n], rejected [n]) and token counts from token log-probs of a
    batch laid out by collate_pairs (rows c_0..c_{n-1}, r_0..r_{n-1}) or pack_pairs / share_pairs (``seq_id``)."""
    mask = batch["loss_mask"].to(logps.dtype)
    if "seq_id" in batch:
        num = int(batch["num_sequences"])
        sums, counts = segment_sum(logps * mask, batch["seq_id"], num), segment_sum(mask, batch["seq_id"], num)
    else:
        sums, counts = (logps * mask).sum(-1), mask.sum(-1)
    if average:
        sums = sums / counts.clamp(min=1)
    n = sums.shape[0] // 2
    return sums[:n], sums[n:], counts[:n], counts[n:]


@torch.no_grad()
def pair_logps_table(strategy, pairs: list[dict], pad_id: int, batch_size: int, topology: Topology,
                     make_batch: Callable[[list[dict]], dict] | None = None) -> tuple[torch.Tensor, int]:
    """[N, 4] table (chosen sum, rejected sum, chosen tokens, rejected tokens) of the response
    log-probs under ``strategy``'s model, on every rank, and the number of pairs this rank forwarded.
    ``make_batch``: the stage's layout (pack_pairs, share_pairs; None: collate_pairs with ``pad_id``); the
    values agree to float tolerance, so the cache key does not include it. A collective: every rank makes the same
    number of forwards."""
    table = torch.zeros(len(pairs), 4, dtype=torch.float64)
    forwarded = 0
    for ids, chunk in sharded_batches(pairs, batch_size, topology):
        batch = to_device(make_batch(chunk) if make_batch else collate_pairs(chunk, pad_id), topology.device)
        chosen, rejected, n_c, n_r = pair_logps(strategy.token_logps(batch), batch, average=False)
        if ids:
            table[ids] = torch.stack([chosen, rejected, n_c, n_r], dim=1).double().cpu()
            forwarded += len(ids)
    # Each pair was computed by exactly one data-parallel rank; tensor-parallel peers hold the same rows.
    return all_reduce_sum(table, topology.dp_group), forwarded


def load_table(path: Path, num_pairs: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    table = torch.load(path, weights_only=True)
    if table.shape != (num_pairs, 4):
        log.warning("ignoring reference cache %s: shape %s, expected (%d, 4)", path, tuple(table.shape), num_pairs)
        return None
    return table


def save_table(path: Path, table: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(table, tmp)
    os.replace(tmp, path)


def attach(pairs: Sequence[dict], table: torch.Tensor, average: bool) -> Sequence[dict]:
    """``pairs`` with each pair's reference log-probs ("ref_chosen", "ref_rejected"), summed or averaged
    like the policy's: a view, since a memory-mapped dataset (trainer/data/cache.py) hands out a new
    dict per access."""
    chosen, rejected = table[:, 0], table[:, 1]
    if average:
        chosen, rejected = chosen / table[:, 2].clamp(min=1), rejected / table[:, 3].clamp(min=1)
    return WithReference(pairs, chosen.tolist(), rejected.tolist())


class WithReference(SequenceABC):
    """Item i of ``pairs`` plus its reference log-probs."""

    def __init__(self, pairs: Sequence[dict], chosen: list[float], rejected: list[float]) -> None:
        self.pairs, self.chosen, self.rejected = pairs, chosen, rejected

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return {**self.pairs[i], "ref_chosen": self.chosen[i], "ref_rejected": self.rejected[i]}


def ranking_metrics(table: torch.Tensor, ref_table: torch.Tensor | None = None) -> dict[str, float]:
    """From pair_logps_table tables: how often the model ranks chosen above rejected by mean token
    log-prob (needs no reference; comparable across stages), and, given the reference's table, how
    often the implicit reward (summed log-prob gain over the reference) prefers chosen, and its margin."""
    mean_c, mean_r = table[:, 0] / table[:, 2].clamp(min=1), table[:, 1] / table[:, 3].clamp(min=1)
    metrics = {"eval_preference_accuracy": (mean_c > mean_r).double().mean().item(),
               "eval_response_logp_gap": (mean_c - mean_r).mean().item()}
    if ref_table is not None:
        margin = (table[:, 0] - ref_table[:, 0]) - (table[:, 1] - ref_table[:, 1])
        metrics.update(eval_reward_accuracy=(margin > 0).double().mean().item(), eval_margin=margin.mean().item())
    return metrics
