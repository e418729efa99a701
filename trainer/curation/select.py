"""DSIR: data selection by importance resampling (Xie et al. 2023, "Data Selection for Language Models
via Importance Resampling", §3).

Pick ``k`` records of a large raw pool (the inputs) that look like a small target set (``target``):

1. Features: each text's unigrams and bigrams (trainer/curation/text.py tokens), hashed into
   ``buckets`` buckets (10,000 as in the paper), a count vector c(x) per record.
2. Two bag-of-n-grams models, one fitted on the target, one on the raw pool:
   p(j) = (N_j + α) / (Σ N + α·B), with α = ``smoothing`` (additive, so a bucket the target never saw
   has a finite, small probability rather than a log of zero).
3. Importance weight of a raw record, the likelihood ratio of its features under the two models:
   log w(x) = Σ_j c_j(x) · (log p_target(j) − log p_raw(j)).
4. Resample k records without replacement with probability ∝ w, by the Gumbel top-k trick: the k
   largest log w(x) + G(x), G ~ Gumbel(0, 1) i.i.d. from ``seed``, are a sample without replacement
   of the same law as drawing ∝ w one at a time (Kool et al. 2019). Selected records keep input order.

The report's ``kl_reduction`` (the paper's data-metric, §4): KL(p_target ‖ p_raw) − KL(p_target ‖
p_selected), where each p is the smoothed hashed-feature distribution above fitted on that set; in
nats. Positive means the selection moved the feature distribution towards the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.curation.common import (Inputs, Result, bad_option, key_text, on_bad_record_option, option,
                                     read_inputs)
from trainer.curation.report import plot_histogram
from trainer.curation.text import hash32, ngrams, tokens

NAME = "select"
SUMMARY = "DSIR: importance-resample the inputs towards --target (hashed unigram+bigram features)"
PLOT = "log_weights.png"


@dataclass
class Options:
    target: list = option([], "JSONL file(s) of the target distribution (repeat the flag for several)", type=str,
                          many=True)
    k: int = option(None, "number of records to select", type=int)
    fraction: float = option(None, "or: fraction (0, 1] of the inputs to select", type=float)
    buckets: int = option(10000, "hash buckets of the n-gram features")
    smoothing: float = option(1.0, "additive smoothing α of the bag-of-n-grams models")
    key: str = option("conversation", "text the features are computed on", choices=("conversation", "prompt"))
    seed: int = option(0, "seed of the Gumbel noise")
    plot: bool = option(True, f"write {PLOT} (importance weights of all and of the selected)")
    on_bad_record: str = on_bad_record_option()


def kinds(options: Options) -> tuple[str, ...]:
    return ("chat", "row", "preference", "candidates")


def features(text: str, buckets: int) -> np.ndarray:
    """The bucket ids of a text's unigrams and bigrams (one id per occurrence)."""
    toks = tokens(text)
    grams = toks + (ngrams(toks, 2) if len(toks) >= 2 else [])
    return np.array([hash32(g) % buckets for g in grams], dtype=np.int64)


def distribution(ids: list[np.ndarray], buckets: int, smoothing: float) -> np.ndarray:
    """The smoothed bag-of-n-grams model p(j) of a set of records."""
    counts = np.zeros(buckets, dtype=np.float64)
    for x in ids:
        counts += np.bincount(x, minlength=buckets)
    return (counts + smoothing) / (counts.sum() + smoothing * buckets)


def kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p ‖ q) in nats; both strictly positive (smoothed)."""
    return float(np.sum(p * (np.log(p) - np.log(q))))


def gumbel_top_k(log_weights: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k indices sampled without replacement with probability ∝ exp(log_weights), sorted ascending."""
    gumbel = np.random.default_rng(seed).gumbel(size=log_weights.shape)
    keys = log_weights + gumbel
    return np.sort(np.argsort(-keys, kind="stable")[:k])


def _count(options: Options, n: int) -> int:
    if (options.k is None) == (options.fraction is None):
        raise bad_option(NAME, "k", "or --fraction (options.fraction): give exactly one")
    if options.fraction is not None:
        if not 0 < options.fraction <= 1:
            raise bad_option(NAME, "fraction", f"must be in (0, 1], got {options.fraction}")
        return max(1, math.floor(options.fraction * n))
    if not 1 <= options.k <= n:
        raise bad_option(NAME, "k", f"must be between 1 and the {n} input records, got {options.k}")
    return options.k


def run(inputs: Inputs, options: Options, output_dir: Path) -> Result:
    if options.buckets < 1 or options.smoothing <= 0:
        raise bad_option(NAME, "buckets" if options.buckets < 1 else "smoothing", "must be positive")
    if not options.target:
        raise bad_option(NAME, "target", "is required: the JSONL file(s) to select towards")
    k = _count(options, len(inputs.rows))
    target = read_inputs(options.target, NAME, kinds(options), options.on_bad_record, what="target")
    if not target.rows:
        raise bad_option(NAME, "target", "holds no valid record")
    raw_ids = [features(key_text(r.record, options.key), options.buckets) for r in inputs.rows]
    target_ids = [features(key_text(r.record, options.key), options.buckets) for r in target.rows]
    p_target = distribution(target_ids, options.buckets, options.smoothing)
    p_raw = distribution(raw_ids, options.buckets, options.smoothing)
    log_ratio = np.log(p_target) - np.log(p_raw)
    log_weights = np.array([log_ratio[x].sum() for x in raw_ids])
    chosen = gumbel_top_k(log_weights, k, options.seed)
    p_selected = distribution([raw_ids[i] for i in chosen], options.buckets, options.smoothing)
    kl_raw, kl_selected = kl(p_target, p_raw), kl(p_target, p_selected)
    by_file: dict[str, int] = {}
    for i in chosen:
        by_file[str(inputs.rows[i].path)] = by_file.get(str(inputs.rows[i].path), 0) + 1
    report = {"target": list(map(str, options.target)), "target_records": len(target.rows),
              "target_bad_records": target.bad_records, "selected": int(k), "buckets": options.buckets,
              "kl_target_raw": kl_raw, "kl_target_selected": kl_selected, "kl_reduction": kl_raw - kl_selected,
              "selected_by_file": by_file,
              "log_weight": {"raw_mean": float(log_weights.mean()), "selected_mean": float(log_weights[chosen].mean())}}
    plots = []
    if options.plot:
        plot_histogram(output_dir / PLOT, {"pool": log_weights.tolist(), "selected": log_weights[chosen].tolist()},
                       "log importance weight")
        plots.append(PLOT)
    lines = [f"Target: {len(target.rows)} records from " + ", ".join(f"`{t}`" for t in options.target), "",
             f"- selected {k} of {len(inputs.rows)} (Gumbel top-k, seed {options.seed})",
             f"- KL(target ‖ raw) = {kl_raw:.4f} nats, KL(target ‖ selected) = {kl_selected:.4f} nats, "
             f"reduction {kl_raw - kl_selected:.4f}",
             "- selected per input file: " + ", ".join(f"`{f}` {n}" for f, n in by_file.items())]
    summary = (f"{NAME}: {k} of {len(inputs.rows)} records selected towards {len(target.rows)} target records; "
               f"KL {kl_raw:.4f} -> {kl_selected:.4f} nats")
    return Result([inputs.rows[i].record for i in chosen], report, summary, lines, plots)
