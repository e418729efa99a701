"""Weighted mixing of several sources by index: a mix is a list of (source, example) pairs over the
sources' own datasets (tokenised caches or lists), so nothing is copied and no mixed file is written.

How many examples each source gives (`mix_counts`): the source with the largest weight is used whole;
every other source gives ``round(n_primary * w / w_primary)`` examples, so ``general: 0.98, code:
0.02`` replays about 2 % code. ``max_samples`` (>= 0) caps a source's count, the primary's included.
Which examples (`mix_index`): a source asked for fewer than it holds gives a sample without
replacement; one asked for more gives whole passes plus such a sample for the rest (epochs, not
draws with replacement). The drawn pairs are then shuffled together.

Everything is a function of the sizes, the spec and the seed: every rank computes the same mix, and
it does not depend on the data-parallel size (sharding into global batches comes after).
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def mix_counts(sizes: list[int], weights: list[float], caps: list[int] | None = None) -> list[int]:
    """Examples drawn from each source (see the module docstring)."""
    if not sizes or len(sizes) != len(weights):
        raise ValueError("mix_counts needs one weight per source")
    if any(w <= 0 for w in weights):
        raise ValueError(f"mix weights must be positive, got {weights}")
    primary = max(range(len(sizes)), key=lambda i: weights[i])
    counts = [sizes[primary] if i == primary else round(sizes[primary] * w / weights[primary])
              for i, w in enumerate(weights)]
    caps = caps or [-1] * len(sizes)
    return [min(c, cap) if cap >= 0 else c for c, cap in zip(counts, caps)]


def mix_index(sizes: list[int], counts: list[int], seed: int) -> list[tuple[int, int]]:
    """Shuffled (source, example) pairs: ``counts[s]`` of source ``s``'s ``sizes[s]`` examples."""
    rng = random.Random(seed)
    pairs: list[tuple[int, int]] = []
    for source, (size, count) in enumerate(zip(sizes, counts)):
        if count > 0 and size == 0:
            raise ValueError(f"mix source {source} has no examples but is asked for {count}")
        passes, rest = divmod(count, size) if size else (0, 0)
        picks = [i for _ in range(passes) for i in range(size)] + rng.sample(range(size), rest)
        pairs += [(source, i) for i in picks]
    rng.shuffle(pairs)
    return pairs


def proportions(pairs: list[tuple[int, int]], names: list[str]) -> dict[str, float]:
    """The realised share of each source in a mix."""
    counts = [0] * len(names)
    for source, _ in pairs:
        counts[source] += 1
    return {name: c / max(len(pairs), 1) for name, c in zip(names, counts)}


class MixedDataset(Sequence):
    """Item k of the mix is ``sources[s][i]`` for the k-th (s, i) of ``pairs``; nothing is copied."""

    def __init__(self, sources: list[Sequence], pairs: list[tuple[int, int]]) -> None:
        self.sources = sources
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        source, i = self.pairs[k]
        return self.sources[source][i]
