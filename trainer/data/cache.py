"""A tokenised dataset written once into memory-mapped flat arrays that every rank and later run reuses.

Why: tokenising on every rank before step 1 costs world_size × the work, holds every example as Python
objects (RSS grows with the dataset), and on multi-node jobs the slowest rank makes the others time out
in their first collective. Here rank 0 streams the records through the tokenize function once and
appends each example to flat files; the other ranks wait at a barrier and memory-map what it wrote.

Layout of `<cache_dir>/tokenized/<key>/`:
- `<field>.ids` int32 and `<field>.off` int64 (count + 1 offsets) for every field whose value is a list
  of ints (token ids, masks): example i's value is `ids[off[i]:off[i+1]]`;
- `other.bin` + `other.off`: the example's remaining fields (rewards, targets, None) as one JSON object
  each, with the field order, so an item is exactly the dict the tokenize function returned;
- `meta.json`, written last: the key, the count, every file's size, and the read stats (`records`,
  `skipped_bad`, `dropped_length`) so a cache hit reports what the build saw.

Crash safety: everything is written into `<key>.tmp-<pid>` and renamed into place in one step, and
`open_cache` verifies meta.json against the files (sizes, offset counts, last offsets) before use; a
missing or inconsistent cache is removed and rebuilt, never read.

The key (`cache_key`) is a sha256 of the format version, the data kind and its options, every data
file's content hash, the tokenizer (class, vocabulary, special tokens), the chat template, max_length
and truncation: any change that could change a token gives a new directory. Caches live under
`data.cache_dir`, never next to the data, so a read-only data directory works.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from trainer.runtime.identity import file_hash

FORMAT_VERSION = 1
_INT32 = (-(2 ** 31), 2 ** 31 - 1)
_FLUSH = 4096  # examples buffered before an append to the flat files


def tokenizer_fingerprint(tokenizer) -> dict:
    """What decides a tokenizer's output: class, vocabulary (incl. merges' effect on ids), special
    tokens and chat template. The vocabulary is hashed, not stored."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    merges = ""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast tokenizers: the full model (merges included) as JSON
        merges = hashlib.sha256(backend.to_str().encode()).hexdigest()
    return {
        "class": type(tokenizer).__name__,
        "vocab": hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest(),
        "model": merges,
        "special": {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())},
        "chat_template": str(getattr(tokenizer, "chat_template", None)),
    }


def cache_key(kind: str, options: dict, files: Iterable[Path], tokenizer, max_length: int, truncation: str) -> str:
    """The cache directory name for one dataset: see the module docstring for what goes in."""
    parts = {"version": FORMAT_VERSION, "kind": kind, "options": options,
             "files": [file_hash(Path(f)) for f in files], "tokenizer": tokenizer_fingerprint(tokenizer),
             "max_length": max_length, "truncation": truncation}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _int_list(value) -> bool:
    return (type(value) is list and all(type(x) is int for x in value)
            and (not value or _INT32[0] <= min(value) and max(value) <= _INT32[1]))


class _Writer:
    """Appends examples to the flat files of a cache directory being built."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.count = 0
        self.fields: list[str] = []          # int-list fields, in first-seen order
        self.ends: dict[str, int] = {}       # current end offset of each field's ids
        self.buf: dict[str, list] = {}       # field -> pending (ids chunks, offsets)
        self.other_end = 0
        self.other: list[bytes] = []
        self.other_off: list[int] = []

    def _field(self, name: str) -> None:
        if name not in self.ends:
            self.fields.append(name)
            self.ends[name] = 0
            # Earlier examples had no value for this field: count + 1 zero offsets.
            np.zeros(self.count + 1, dtype=np.int64).tofile(self.dir / f"{name}.off")
            (self.dir / f"{name}.ids").touch()
            self.buf[name] = [[], []]

    def add(self, example: dict) -> None:
        ints = {k: v for k, v in example.items() if _int_list(v)}
        for name in ints:
            self._field(name)
        for name in self.fields:
            ids, offs = self.buf[name]
            value = ints.get(name, [])
            ids.append(value)
            self.ends[name] += len(value)
            offs.append(self.ends[name])
        rest = {k: v for k, v in example.items() if k not in ints}
        blob = json.dumps({"order": list(example), "rest": rest}, allow_nan=True).encode()
        self.other.append(blob)
        self.other_end += len(blob)
        self.other_off.append(self.other_end)
        self.count += 1
        if len(self.other) >= _FLUSH:
            self.flush()

    def flush(self) -> None:
        for name in self.fields:
            ids, offs = self.buf[name]
            with open(self.dir / f"{name}.ids", "ab") as f:
                for value in ids:
                    np.asarray(value, dtype=np.int32).tofile(f)
            with open(self.dir / f"{name}.off", "ab") as f:
                np.asarray(offs, dtype=np.int64).tofile(f)
            self.buf[name] = [[], []]
        with open(self.dir / "other.bin", "ab") as f:
            f.write(b"".join(self.other))
        with open(self.dir / "other.off", "ab") as f:
            np.asarray(self.other_off, dtype=np.int64).tofile(f)
        self.other, self.other_off = [], []


def build_cache(directory: Path, examples: Iterable[dict], stats_of, key: str) -> None:
    """Write `examples` (a stream) as the cache `directory`, atomically; `stats_of()` gives the read
    stats once the stream is exhausted."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    writer = _Writer(tmp)
    writer.other_off.append(0)
    (tmp / "other.bin").touch()
    for example in examples:
        writer.add(example)
    writer.flush()
    sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    meta = {"version": FORMAT_VERSION, "key": key, "count": writer.count, "fields": writer.fields,
            "sizes": sizes, "stats": stats_of()}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(directory, ignore_errors=True)  # an invalid cache that open_cache refused
    os.replace(tmp, directory)


class CachedDataset(Sequence):
    """A read-only Sequence over a verified cache directory: item i is the example dict, exactly as the
    tokenize function returned it (same keys, order and value types)."""

    def __init__(self, directory: Path, meta: dict) -> None:
        self.dir = directory
        self.meta = meta
        self.stats = dict(meta["stats"])
        self._n = meta["count"]
        self._ids = {f: _map(directory / f"{f}.ids", np.int32) for f in meta["fields"]}
        self._off = {f: _map(directory / f"{f}.off", np.int64) for f in meta["fields"]}
        self._blob = _map(directory / "other.bin", np.uint8)
        self._blob_off = _map(directory / "other.off", np.int64)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(i)
        a, b = int(self._blob_off[i]), int(self._blob_off[i + 1])
        other = json.loads(bytes(self._blob[a:b]))
        rest = other["rest"]
        out = {}
        for name in other["order"]:
            if name in rest:
                out[name] = rest[name]
            else:
                off = self._off[name]
                out[name] = self._ids[name][int(off[i]):int(off[i + 1])].tolist()
        return out


def _map(path: Path, dtype) -> np.ndarray:
    """A read-only memory map (an empty array for an empty file, which np.memmap refuses)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def open_cache(directory: Path, key: str) -> CachedDataset | None:
    """The cache at `directory` if meta.json is present and agrees with every file; None otherwise."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
        if meta.get("version") != FORMAT_VERSION or meta.get("key") != key:
            return None
        for name, size in meta["sizes"].items():
            if (directory / name).stat().st_size != size:
                return None
        n = meta["count"]
        for name in [*meta["fields"], "other"]:
            off = _map(directory / f"{name}.off", np.int64)
            data = directory / (f"{name}.ids" if name != "other" else "other.bin")
            width = 4 if name != "other" else 1
            if len(off) != n + 1 or int(off[-1]) * width != data.stat().st_size or np.any(np.diff(off) < 0):
                return None
        return CachedDataset(directory, meta)
    except (OSError, ValueError, KeyError, TypeError):
        return None
