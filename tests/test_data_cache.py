"""The tokenised cache: a second read hits it, a tokenizer or chat-template change misses it, a
corrupted cache is rebuilt, a read-only data directory works, items equal what tokenize returned."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from trainer.data.cache import open_cache
from trainer.data.records import validate_chat_record
from trainer.stages import common


class FakeTokenizer:
    chat_template = "{{ messages }}"
    special_tokens_map = {"eos_token": "</s>"}

    def get_vocab(self):
        return {"a": 0, "b": 1}


class Solo:
    is_main, world_size = True, 1

    def barrier(self):
        pass


def tokenize(record):
    text = record["messages"][-1]["content"]
    if len(text) > 6:
        return None
    return {"input_ids": [ord(c) for c in text], "assistant_mask": [1] * len(text), "reward": 0.5 * len(text),
            "none": None, "empty": []}


def data(tmp_path: Path, n: int = 20) -> Path:
    path = tmp_path / "data" / "d.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "q"},
                                                     {"role": "assistant", "content": "x" * (i % 9 + 1)}]}) + "\n"
                            for i in range(n)))
    return path


def load(path: Path, cache: Path, tokenizer=None):
    cfg = OmegaConf.create({"on_bad_record": "error", "max_length": 8, "truncation": "drop", "cache_dir": str(cache)})
    return common.tokenized_records([path], validate_chat_record, tokenize, cfg,
                                    {"kind": "chat", "tokenizer": tokenizer or FakeTokenizer()}, Solo())


def test_second_read_hits_and_items_equal_tokenize(tmp_path: Path) -> None:
    path = data(tmp_path)
    expected, plain = common.tokenized_records([path], validate_chat_record, tokenize, OmegaConf.create(
        {"on_bad_record": "error", "max_length": 8, "truncation": "drop"}))
    built, stats = load(path, tmp_path / "c")
    assert stats["cache"] == "built" and stats["tokenized_ranks"] == 1
    hit, stats2 = load(path, tmp_path / "c")
    assert stats2["cache"] == "hit" and stats2["tokenized_ranks"] == 0
    assert list(hit) == list(built) == expected and hit[-1] == expected[-1]
    assert {k: stats2[k] for k in plain} == plain == {"records": 20, "skipped_bad": 0, "dropped_length": 6}


def test_tokenizer_or_template_change_is_a_new_key(tmp_path: Path) -> None:
    path = data(tmp_path)
    first = load(path, tmp_path / "c")[0].dir
    other = FakeTokenizer()
    other.chat_template = "{{ other }}"
    assert load(path, tmp_path / "c", other)[1]["cache"] == "built"
    vocab = FakeTokenizer()
    vocab.get_vocab = lambda: {"a": 1, "b": 0}
    assert load(path, tmp_path / "c", vocab)[1]["cache"] == "built"
    assert len({p.name for p in (tmp_path / "c" / "tokenized").iterdir()}) == 3 and first.is_dir()


@pytest.mark.parametrize("damage", ["truncate", "meta", "offsets"])
def test_corrupted_cache_is_rebuilt(tmp_path: Path, damage: str) -> None:
    path = data(tmp_path)
    ds, _ = load(path, tmp_path / "c")
    expected = list(ds)
    if damage == "truncate":
        ids = ds.dir / "input_ids.ids"
        ids.write_bytes(ids.read_bytes()[:-4])
    elif damage == "meta":
        (ds.dir / "meta.json").write_text("{")
    else:
        off = np.fromfile(ds.dir / "input_ids.off", dtype=np.int64)
        off[3] = 10 ** 6
        off.tofile(ds.dir / "input_ids.off")
    assert open_cache(ds.dir, ds.meta["key"]) is None
    again, stats = load(path, tmp_path / "c")
    assert stats["cache"] == "built" and list(again) == expected


def test_read_only_data_directory_works(tmp_path: Path) -> None:
    path = data(tmp_path)
    os.chmod(path.parent, stat.S_IRUSR | stat.S_IXUSR)
    try:
        ds, stats = load(path, tmp_path / "c")
        assert stats["cache"] == "built" and len(ds) == 14
        assert sorted(p.name for p in path.parent.iterdir()) == ["d.jsonl"]
    finally:
        os.chmod(path.parent, stat.S_IRWXU)
