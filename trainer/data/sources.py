"""Streamed record readers for every data format a path may hold: JSONL, JSONL.gz, Parquet, and a
local HF `datasets` directory (`Dataset.save_to_disk`).

Why: a dataset bigger than a rank's memory must still load, so every reader is a generator that holds
one line (JSONL) or one record batch (Parquet row group slice, Arrow IPC batch) at a time. The format
is chosen by the path alone (`format_of`), so a data path anywhere a JSONL is accepted may be any of
these. Bad records are handled exactly as `trainer.data.records.read_jsonl_lines` handles them: under
`on_bad_record="error"` a `DataError` whose message starts with the record's location, under `"skip"`
a warning and a count. The location is `path:line` for line formats and `path:row N` (0-based, as
`dataset[N]` / `df.iloc[N]` index it) for columnar ones.

Columnar formats give every row every column: a key absent from a record is a null in the file, so
top-level nulls are dropped to give back the record a JSONL line would have held (a JSONL record with an
explicit `null` therefore reads as one without the key; no format in trainer/data treats them apart).
The HF directory is read with pyarrow alone (its `state.json` lists the `.arrow` stream files), so the
`datasets` package is not needed at run time.
"""

from __future__ import annotations

import codecs
import gzip
import json
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path

from trainer.data.records import ON_BAD_RECORD, DataError, _check_bytes, checked

logger = logging.getLogger(__name__)

FORMATS = ("jsonl", "jsonl.gz", "parquet", "hf")
_BATCH_ROWS = 1024  # rows per Parquet batch: bounds memory per batch, whatever the row-group size


def format_of(path: str | Path) -> str:
    """The format a data path holds, by suffix or (a directory) by its `state.json`."""
    path = Path(path)
    if path.is_dir():
        if (path / "state.json").is_file():
            return "hf"
        raise FileNotFoundError(f"data directory {path} is not a datasets save_to_disk directory "
                                "(no state.json); give a .jsonl, .jsonl.gz or .parquet file, or such a directory")
    name = path.name.lower()
    if name.endswith((".jsonl.gz", ".json.gz")):
        return "jsonl.gz"
    if name.endswith(".parquet"):
        return "parquet"
    return "jsonl"


class RecordStream:
    """The valid records of one data path, streamed: iterate for `(location, record)`, where
    `f"{path}:{location}"` names the record; `skipped` counts the bad records skipped so far.

    Why a class: a generator cannot also hand back the skip count; one pass over the stream fills it.
    """

    def __init__(self, path: str | Path, validate: Callable[[dict], None], on_bad_record: str = "error") -> None:
        if on_bad_record not in ON_BAD_RECORD:
            raise ValueError(f"on_bad_record must be one of {', '.join(ON_BAD_RECORD)}, got {on_bad_record!r}")
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"data file not found: {self.path}")
        self.format = format_of(self.path)
        self.validate = validate
        self.on_bad_record = on_bad_record
        self.skipped = 0

    def __iter__(self) -> Iterator[tuple[int | str, dict]]:
        self.skipped = 0
        rows = _line_rows if self.format in ("jsonl", "jsonl.gz") else _columnar_rows
        for location, result in rows(self.path, self.format, self.validate):
            if isinstance(result, dict):
                yield location, result
                continue
            message = f"{self.path}:{location}: {result}"
            if self.on_bad_record == "error":
                raise DataError(message)
            logger.warning("skipping bad record: %s", message)
            self.skipped += 1


def _line_rows(path: Path, fmt: str, validate) -> Iterator[tuple[int, dict | str]]:
    """(line number, record or reason) per non-blank line of a JSONL or gzipped JSONL file."""
    opener = gzip.open if fmt == "jsonl.gz" else open
    with opener(path, "rb") as f:
        try:
            for lineno, raw in enumerate(f, start=1):
                if lineno == 1:
                    raw = raw.removeprefix(codecs.BOM_UTF8)
                result = _check_bytes(raw, validate)
                if result is not None:
                    yield lineno, result
        except (OSError, EOFError) as e:  # a truncated or corrupt gzip stream
            raise DataError(f"{path}: cannot read the gzip stream ({e})") from None


def _columnar_rows(path: Path, fmt: str, validate) -> Iterator[tuple[str, dict | str]]:
    """("row N", record or reason) per row of a Parquet file or an HF save_to_disk directory."""
    row = 0
    for batch in _arrow_batches(path, fmt):
        for record in batch.to_pylist():
            yield f"row {row}", _check_record(record, validate)
            row += 1


def _arrow_batches(path: Path, fmt: str):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading {'Parquet' if fmt == 'parquet' else 'a datasets directory'} needs "
                        "pyarrow, which is not installed: pip install 'stagecraft[data]' (or pyarrow)") from None

    if fmt == "parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS)
        return
    for file in hf_arrow_files(path):
        with pa.memory_map(str(file)) as source:
            yield from pa.ipc.open_stream(source)


def hf_arrow_files(path: str | Path) -> list[Path]:
    """The `.arrow` files of a `save_to_disk` directory, in order (its state.json `_data_files`)."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    files = [path / entry["filename"] for entry in state.get("_data_files", [])]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{path}/state.json lists data files that are missing: {', '.join(missing)}")
    return files


def data_files_of(path: str | Path) -> list[Path]:
    """The files whose bytes make up a data path (for content hashing)."""
    path = Path(path)
    return hf_arrow_files(path) + [path / "state.json"] if format_of(path) == "hf" else [path]


def _check_record(record: dict, validate) -> dict | str:
    """A columnar row as the record JSONL would hold, or the reason it is bad (NaN refused as in JSONL)."""
    record = {k: v for k, v in record.items() if v is not None}
    if _has_non_finite(record):
        return "a float is NaN or infinite (use null for a missing value)"
    return checked(record, validate)


def _has_non_finite(value: object) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False
