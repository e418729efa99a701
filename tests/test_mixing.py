"""Weighted mixing by index (trainer/data/mixing.py): proportions over 10k samples, caps, whole passes,
determinism; through the command, DP=1 and DP=2 train on the same global batches of a mix, every
source is tokenised once (by rank 0) and hit on the rerun, and nothing mixed is written."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.conftest import assert_series_close, losses, run_stagecraft
from trainer.data.mixing import MixedDataset, mix_counts, mix_index, proportions
from trainer.data.synthetic import generate_chat_records, write_jsonl


def test_proportions_over_ten_thousand_samples():
    sizes = [9_800, 5_000, 40]
    counts = mix_counts(sizes, [0.98, 0.015, 0.005])
    assert counts == [9_800, 150, 50]  # the primary whole; the others by weight, relative to it
    pairs = mix_index(sizes, counts, seed=7)
    shares = proportions(pairs, ["a", "b", "c"])
    assert abs(shares["a"] - 0.98) < 0.001 and abs(shares["b"] - 0.015) < 0.001 and abs(shares["c"] - 0.005) < 0.001
    # Source c holds 40 examples and is asked for 50: one whole pass plus 10 drawn without replacement.
    seen = Counter(i for s, i in pairs if s == 2)
    assert len(seen) == 40 and sorted(Counter(seen.values()).items()) == [(1, 30), (2, 10)]
    # b: a sample without replacement; a: every example once.
    assert len({i for s, i in pairs if s == 1}) == 150
    assert sorted(i for s, i in pairs if s == 0) == list(range(9_800))


def test_caps_and_determinism():
    assert mix_counts([1000, 1000], [0.5, 0.5], [100, -1]) == [100, 1000]
    assert mix_counts([1000, 500], [1.0, 0.5], [-1, 200]) == [1000, 200]
    a = mix_index([100, 50], [100, 20], seed=3)
    assert a == mix_index([100, 50], [100, 20], seed=3) and a != mix_index([100, 50], [100, 20], seed=4)
    data = MixedDataset([list(range(100)), [f"b{i}" for i in range(50)]], a)
    assert len(data) == 120 and data[:3] == [data[0], data[1], data[2]]
    with pytest.raises(ValueError, match="positive"):
        mix_counts([1, 1], [1.0, 0.0])


@pytest.mark.distributed
def test_a_mix_trains_the_same_on_one_and_two_ranks(tmp_path, cache_dir):
    files = []
    for k, families in enumerate([["reverse", "sort"], ["count"]]):
        path = tmp_path / f"src{k}.jsonl"
        write_jsonl(path, generate_chat_records(96 if k == 0 else 40, 11 + k, families))
        files.append(path)
    mix = f"data.mix=[{{train:[{files[0]}],weight:0.75}},{{train:[{files[1]}],weight:0.25,max_samples:24}}]"
    common = [mix, "stage.max_steps=4", "stage.global_batch_size=16", "stage.micro_batch_size=4",
              "checkpoint.export_hf=false"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_stagecraft(one, common, cache_dir)
    run_stagecraft(two, common, cache_dir, nproc=2)
    assert_series_close(losses(one), losses(two), 1e-5)
    stats = [json.loads((run / "stages/sft/COMPLETE.json").read_text())["train_data"] for run in (one, two)]
    # 96 from the primary, min(round(96 * 0.25 / 0.75), 24) = 24 from the other: 96 / 120 and 24 / 120.
    assert list(stats[0]["mix"].values()) == [0.8, 0.2] and stats[0]["mix"] == stats[1]["mix"]
    # The first run tokenised each source once, on rank 0; the second (2 ranks) read both caches.
    assert (stats[0]["cache"], stats[0]["tokenized_ranks"]) == ("built", 2)
    assert (stats[1]["cache"], stats[1]["tokenized_ranks"]) == ("hit", 0)
    assert not (one / "data").exists() and not (two / "data").exists()  # no mixed file was written
