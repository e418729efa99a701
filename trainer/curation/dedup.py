"""Exact and near-duplicate removal: MinHash signatures, LSH banding, verified Jaccard similarity.

What is compared (``key``): the prompt, or the whole conversation (prompt and every response). Text is
normalised (NFKC, lower case, whitespace collapsed; trainer/curation/text.py) and cut into shingles,
the ``ngram``-token n-grams (a CJK ideograph is one token), each hashed to 32 bits.

- exact: two records are exact duplicates when their normalised key texts are equal.
- near: when the Jaccard similarity |A ∩ B| / |A ∪ B| of their shingle sets is >= ``threshold``
  (default 0.8). A record with no shingle (empty text) is never a near duplicate.

Records are visited in input order and each is compared with the records kept so far, so every dropped
record names a kept one it duplicates and the first of a group is the one kept (no transitive chains:
A~B and B~C with A≁C keeps A and C). Deterministic for a given ``seed``.

Finding near duplicates without comparing all pairs: a MinHash signature is ``num_perm`` minima
h_i(S) = min_{x∈S} (a_i·x + b_i) mod p over the shingle hashes x, p = 2^32 − 5 (prime), with (a_i, b_i)
drawn from ``seed``; P[h_i(A) = h_i(B)] = J(A, B). The signature is cut into b bands of r rows, and two
records become candidates when any band is identical: P[candidate] = 1 − (1 − J^r)^b, an S-curve
around (1/b)^(1/r). (b, r) are chosen, b·r <= num_perm, to minimise 0.1·FP + 0.9·FN, the areas under that
curve below and above ``threshold`` (datasketch's criterion with recall weighted up): every candidate
is then checked with its exact Jaccard, so a false positive costs only a comparison, while a missed
duplicate stays in the data. At 128 permutations and 0.8 this gives b = 14, r = 9: a pair at J = 0.8 is
found with probability 0.87, at 0.85 with 0.975, at 0.9 with 0.999 (``report.lsh``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from trainer.curation.common import Drops, Inputs, Result, bad_option, excerpt, key_text, on_bad_record_option, option
from trainer.curation.text import hash32, ngrams, normalize, tokens

NAME = "dedup"
SUMMARY = "remove exact and near duplicates (MinHash + LSH, verified Jaccard >= --threshold)"
_PRIME = 4294967291  # 2^32 - 5: with a, x < 2^32, a·x + b stays below 2^64, so uint64 never overflows
_FP_WEIGHT, _FN_WEIGHT = 0.1, 0.9


@dataclass
class Options:
    key: str = option("prompt", "what is compared: the prompt, or the whole conversation",
                      choices=("prompt", "conversation"))
    exact: bool = option(True, "remove exact duplicates (equal after normalisation)")
    near: bool = option(True, "remove near duplicates (Jaccard of shingle sets >= --threshold)")
    threshold: float = option(0.8, "Jaccard similarity at or above which two records are near duplicates")
    ngram: int = option(3, "tokens per shingle")
    num_perm: int = option(128, "MinHash permutations (signature length)")
    seed: int = option(0, "seed of the MinHash permutations")
    examples: int = option(5, "dropped records quoted per reason in the report")
    on_bad_record: str = on_bad_record_option()


def kinds(options: Options) -> tuple[str, ...]:
    return ("chat", "row", "preference", "candidates")


@lru_cache(maxsize=None)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising the weighted false-positive and false-negative areas (module doc)."""
    s = np.linspace(0.0, 1.0, 1001)
    below, above = s <= threshold, s >= threshold
    best = None
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1.0 - (1.0 - s**r) ** b
            err = (_FP_WEIGHT * np.trapezoid(p[below], s[below])
                   + _FN_WEIGHT * np.trapezoid(1.0 - p[above], s[above]))
            if best is None or err < best[0] - 1e-15:
                best = (err, b, r)
    return best[1], best[2]


def candidate_probability(similarity: float, bands: int, rows: int) -> float:
    """P[a pair with this Jaccard similarity shares at least one band]."""
    return 1.0 - (1.0 - similarity**rows) ** bands


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) of the `num_perm` hash functions, a in [1, p), b in [0, p)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(1, _PRIME, num_perm, dtype=np.uint64), rng.integers(0, _PRIME, num_perm, dtype=np.uint64))


def shingles(text: str, n: int) -> np.ndarray:
    """The sorted unique 32-bit hashes of the n-token shingles of `text`."""
    return np.unique(np.array([hash32(g) for g in ngrams(tokens(text), n)], dtype=np.uint64))


def signature(hashes: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MinHash signature [num_perm] of a non-empty set of shingle hashes."""
    x = hashes % np.uint64(_PRIME)
    return ((a[:, None] * x[None, :] + b[:, None]) % np.uint64(_PRIME)).min(axis=1)


def jaccard(x: np.ndarray, y: np.ndarray) -> float:
    """|x ∩ y| / |x ∪ y| of two sorted unique arrays."""
    inter = np.intersect1d(x, y, assume_unique=True).size
    return inter / (x.size + y.size - inter)


def run(inputs: Inputs, options: Options, output_dir: Path) -> Result:
    if not 0 < options.threshold <= 1:
        raise bad_option(NAME, "threshold", f"must be in (0, 1], got {options.threshold}")
    for name in ("ngram", "num_perm"):
        if getattr(options, name) < 1:
            raise bad_option(NAME, name, f"must be positive, got {getattr(options, name)}")
    bands, rows = lsh_params(options.threshold, options.num_perm)
    a, b = permutations(options.num_perm, options.seed)
    drops = Drops(options.examples)
    exact_seen: dict[str, int] = {}
    buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
    sets: dict[int, np.ndarray] = {}
    kept, candidates = [], 0
    for i, row in enumerate(inputs.rows):
        text = key_text(row.record, options.key)
        digest = hashlib.sha256(normalize(text).encode("utf-8")).hexdigest()
        if options.exact and digest in exact_seen:
            twin = inputs.rows[exact_seen[digest]]
            drops.add(row, "exact", duplicate_of=twin.where, text=excerpt(text, 80))
            continue
        keys = []
        if options.near:
            hashes = shingles(text, options.ngram)
            if hashes.size:
                sig = signature(hashes, a, b)
                keys = [sig[k * rows:(k + 1) * rows].tobytes() for k in range(bands)]
                found = sorted({j for k, key in enumerate(keys) for j in buckets[k].get(key, ())})
                candidates += len(found)
                best = max(((jaccard(hashes, sets[j]), -j) for j in found), default=None)
                if best is not None and best[0] >= options.threshold:
                    twin = inputs.rows[-best[1]]
                    drops.add(row, "near", duplicate_of=twin.where, jaccard=round(best[0], 4),
                              text=excerpt(text, 80))
                    continue
                sets[i] = hashes
        exact_seen.setdefault(digest, i)
        for k, key in enumerate(keys):
            buckets[k].setdefault(key, []).append(i)
        kept.append(row.record)
    exact, near = drops.counts.get("exact", 0), drops.counts.get("near", 0)
    lsh = {"bands": bands, "rows": rows, "num_perm": options.num_perm,
           "candidate_probability": {str(s): round(candidate_probability(s, bands, rows), 4)
                                     for s in (0.5, 0.7, options.threshold, 0.9, 0.95)}}
    report = {"key": options.key, "threshold": options.threshold, "ngram": options.ngram,
              "exact_duplicates": exact, "near_duplicates": near, "candidate_pairs": candidates, "lsh": lsh,
              "examples": drops.examples}
    lines = [f"Compared: {options.key}; near duplicate: Jaccard of {options.ngram}-token shingle sets >= "
             f"{options.threshold:g}; LSH {bands} bands × {rows} rows of {options.num_perm} MinHashes "
             f"(a pair at the threshold is a candidate with probability "
             f"{candidate_probability(options.threshold, bands, rows):.3f}).", "",
             f"- exact duplicates removed: {exact}", f"- near duplicates removed: {near}",
             f"- candidate pairs verified: {candidates}"]
    for reason, examples in drops.examples.items():
        lines += ["", f"### Dropped: {reason}", ""]
        lines += [f"- `{e['where']}` duplicates `{e['duplicate_of']}`"
                  + (f" (Jaccard {e['jaccard']})" if "jaccard" in e else "") + f": {e['text']}" for e in examples]
    summary = (f"{NAME}: {len(inputs.rows)} records, {exact} exact and {near} near duplicates removed, "
               f"{len(kept)} kept")
    return Result(kept, report, summary, lines)
