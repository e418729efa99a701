"""Every data format (JSONL, JSONL.gz, Parquet, HF save_to_disk directory) yields the same records and
names bad records the same way (`path:line` for lines, `path:row N` for columnar files)."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.data.records import DataError, read_jsonl_lines, validate_chat_record
from trainer.data.sources import RecordStream, format_of

RECORDS = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
           for i in range(5)]
BAD = {"messages": [{"role": "user", "content": "q"}]}  # no assistant turn


def write(tmp: Path, fmt: str, records: list[dict]) -> Path:
    if fmt == "jsonl":
        path = tmp / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt == "jsonl.gz":
        path = tmp / "d.jsonl.gz"
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    elif fmt == "parquet":
        path = tmp / "d.parquet"
        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=2)
    else:  # a datasets save_to_disk directory: state.json + arrow IPC stream files
        path = tmp / "hf"
        path.mkdir()
        table = pa.Table.from_pylist(records)
        names = []
        for k, start in enumerate(range(0, len(records), 3)):
            names.append(f"data-{k:05d}-of-00002.arrow")
            with pa.OSFile(str(path / names[-1]), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
                w.write_table(table.slice(start, 3))
        (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
        (path / "dataset_info.json").write_text("{}")
    return path


FORMATS = ["jsonl", "jsonl.gz", "parquet", "hf"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_yields_the_same_records(tmp_path: Path, fmt: str) -> None:
    path = write(tmp_path, fmt, RECORDS)
    assert format_of(path) == fmt
    assert [r for _, r in RecordStream(path, validate_chat_record)] == RECORDS


@pytest.mark.parametrize("fmt, where", [("jsonl", "3"), ("jsonl.gz", "3"), ("parquet", "row 2"), ("hf", "row 2")])
def test_bad_record_is_named_and_skip_counts_it(tmp_path: Path, fmt: str, where: str, caplog) -> None:
    records = [*RECORDS[:2], BAD, *RECORDS[2:]]
    path = write(tmp_path, fmt, records)
    message = f"{path}:{where}: messages has no assistant message with non-empty content"
    with pytest.raises(DataError) as err:
        list(RecordStream(path, validate_chat_record))
    assert str(err.value) == message
    stream = RecordStream(path, validate_chat_record, "skip")
    with caplog.at_level(logging.WARNING):
        assert [r for _, r in stream] == RECORDS
    assert stream.skipped == 1 and message in caplog.text


def test_jsonl_stream_matches_read_jsonl_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"messages": 1}\n\nnot json\n' + json.dumps(RECORDS[0]).encode() + b"\n\xff\n")
    rows, skipped = read_jsonl_lines(path, validate_chat_record, "skip")
    stream = RecordStream(path, validate_chat_record, "skip")
    assert list(stream) == rows and stream.skipped == skipped == 3
