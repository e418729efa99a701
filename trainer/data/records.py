"""Reading JSONL records with validation that names the file and line of every bad record.

Why: a malformed record found mid-run on rank 37 of a cluster job is expensive. Reading validates
every record up front, and every complaint starts with `path:line:` so it can be fixed in an editor.
Whether a bad record stops the run or is skipped and counted is the config's choice (`on_bad_record`).
Bytes are decoded line by line, so invalid UTF-8 is a bad record like any other, not a crash without a
line number. Records that parse but are later dropped (too long) are named by `DropLog`.
"""

from __future__ import annotations

import json
import logging
import re
import reprlib
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

ON_BAD_RECORD = ("error", "skip")
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A bad record; the message always starts with `f"{path}:{lineno}: "`."""


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80


def short_repr(value: object) -> str:
    """`repr` cut to a readable length and nesting depth, for quoting a bad value in an error message.

    Why: the value is whatever a data file held (a 1 MB list, a list nested 900 deep); a plain repr
    would flood the log line or raise RecursionError.
    """
    return _REPR.repr(value)


def read_jsonl(
    path: str | Path, validate: Callable[[dict], None], on_bad_record: str = "error"
) -> tuple[list[dict], int]:
    """Read one JSON object a line (blank lines ignored) and validate each.

    A line that is not UTF-8, not JSON, not an object, or that `validate` rejects with ValueError raises
    DataError under `on_bad_record="error"`; under `"skip"` it is logged once and counted.
    Returns (records, n_skipped).
    """
    rows, n_skipped = read_jsonl_lines(path, validate, on_bad_record)
    return [record for _, record in rows], n_skipped


def read_jsonl_lines(
    path: str | Path, validate: Callable[[dict], None], on_bad_record: str = "error"
) -> tuple[list[tuple[int, dict]], int]:
    """`read_jsonl` that keeps each record's 1-based line number: ([(lineno, record), ...], n_skipped).
    Any format of trainer/data/sources.py is read too (its location, e.g. "row 7", in place of the line).

    Why: a record dropped after reading (e.g. too long once tokenised) should be named by `path:line`
    too, so loaders that drop records use this and hand the line to `DropLog.add`.
    The file is read as bytes and each line decoded on its own (trainer/data/sources.py), so one undecodable line is one bad record
    (`path:line: invalid UTF-8 ...`) instead of a `UnicodeDecodeError` for the whole file. Lines end at
    b"\n" (JSON Lines; a trailing "\r" is JSON whitespace); a UTF-8 BOM on line 1 is ignored.
    """
    from trainer.data.sources import RecordStream  # sources builds on this module's record checks

    stream = RecordStream(path, validate, on_bad_record)
    return list(stream), stream.skipped


def _check_bytes(raw: bytes, validate: Callable[[dict], None]) -> dict | str | None:
    """The parsed record, the reason it is bad, or None for a blank line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"invalid UTF-8 at byte offset {e.start} of the line ({e.reason})"
    if not line.strip():
        return None
    return _check_line(line, validate)


def _reject_constant(name: str) -> None:
    # json.loads accepts NaN / Infinity / -Infinity, which JSON (RFC 8259) does not: a NaN score would
    # pass as a number and poison a loss, so the line is refused where it is read.
    raise ValueError(f"{name} is not valid JSON (use null for a missing value)")


# A \uD800-\uDFFF escape: json.loads turns an unpaired one into a str that cannot be encoded as UTF-8,
# which would fail later inside a tokenizer, far from the line. Only lines with one are walked.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_line(line: str, validate: Callable[[dict], None]) -> dict | str:
    """The parsed record, or the reason it is bad."""
    try:
        record = json.loads(line, parse_constant=_reject_constant)
    except ValueError as e:  # JSONDecodeError, _reject_constant, an int beyond Python's digit limit
        return f"invalid JSON: {e}"
    except RecursionError:
        return "invalid JSON: nested too deeply"
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if _SURROGATE_ESCAPE.search(line) and _has_lone_surrogate(record):
        return "invalid JSON: a string holds an unpaired surrogate escape (\\uD800-\\uDFFF), not valid Unicode"
    return checked(record, validate)


def checked(record: dict, validate: Callable[[dict], None]) -> dict | str:
    """``record`` if ``validate`` accepts it, else the reason it is bad."""
    try:
        validate(record)
    except ValueError as e:
        return str(e)
    except RecursionError:  # comparing or printing a value nested close to json's own limit
        return "record is nested too deeply"
    return record


def _has_lone_surrogate(value: object) -> bool:
    """Whether any key or string anywhere in `value` cannot be encoded as UTF-8 (iterative: no depth limit)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class DropLog:
    """Names the first `limit` records dropped for one reason (`kind`) by `path:line`, then counts the rest.

    Why: a loader that drops records after reading them (e.g. too long once tokenised) used to report
    only a count, leaving the user to guess which lines. One DropLog per dataset (all its files):

        drops = DropLog("length")
        for path in paths:
            rows, skipped = read_jsonl_lines(path, validate, data_cfg.on_bad_record)
            for lineno, record in rows:
                example = tokenize(record)
                if example is None:
                    drops.add(path, lineno, f"longer than data.max_length={data_cfg.max_length}")
        drops.log_summary()            # "... and N more records dropped for length" when over `limit`
        stats["dropped_length"] = drops.count

    Each of the first `limit` drops is a `logging` warning `path:line: reason (record dropped for length)`.
    """

    def __init__(self, kind: str, limit: int = 5) -> None:
        self.kind = kind
        self.limit = limit
        self.count = 0

    def add(self, path: str | Path, lineno: int | str, reason: str) -> None:
        """Count one dropped record; log it while fewer than `limit` have been logged. `lineno` is a line
        number, or a location such as "row 7" for a columnar file (trainer/data/sources.py)."""
        self.count += 1
        if self.count <= self.limit:
            logger.warning("%s:%s: %s (record dropped for %s)", path, lineno, reason, self.kind)

    def summary(self) -> str:
        """One line for the end: what was not named individually, or the total; "" if nothing was dropped."""
        if self.count > self.limit:
            more = self.count - self.limit
            return (f"... and {more} more {_records(more)} dropped for {self.kind} "
                    f"({self.count} in all, the first {self.limit} named above)")
        if self.count:
            return f"{self.count} {_records(self.count)} dropped for {self.kind}"
        return ""

    def log_summary(self) -> None:
        """Log `summary()` as a warning when anything was dropped."""
        if self.count:
            logger.warning("%s", self.summary())


def _records(n: int) -> str:
    return "record" if n == 1 else "records"


def validate_messages(messages: object, name: str = "messages") -> None:
    """Check a conversation: a non-empty list of {"role", "content": str} with known roles.

    Shared by the chat, preference and reward formats, which all embed conversations; `name` is the
    field path used in error messages (e.g. "chosen").
    """
    if not isinstance(messages, list):
        raise ValueError(f"{name} must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError(f"{name} must not be empty")
    for i, message in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object, got {type(message).__name__}")
        if "role" not in message:
            raise ValueError(f"{where} has no 'role'")
        if message["role"] not in ROLES:
            raise ValueError(f"{where}.role must be one of {', '.join(ROLES)}, got {short_repr(message['role'])}")
        if "content" not in message:
            raise ValueError(f"{where} has no 'content'")
        if not isinstance(message["content"], str):
            raise ValueError(f"{where}.content must be a string, got {type(message['content']).__name__}")


def validate_conversation_start(messages: list[dict], name: str = "messages") -> None:
    """Check that a whole conversation (valid messages) opens with a system or user turn.

    Why: an assistant turn's loss span is found by rendering the turns before it with the generation
    prompt (trainer.data.chat), and transformers refuses to render an empty conversation, so a record
    opening with an assistant turn would fail in the tokenizer without naming its line.
    """
    if messages[0]["role"] == "assistant":
        raise ValueError(f"{name}[0] is an assistant turn; a conversation must start with a system or user turn")


def validate_chat_record(rec: dict) -> None:
    """Check the chat/SFT format: `{"messages": [...]}` with at least one non-empty assistant turn.

    Without a non-empty assistant message the record has no token to compute the SFT loss on.
    """
    if "messages" not in rec:
        raise ValueError(f"missing key 'messages' (keys: {', '.join(sorted(rec)) or 'none'})")
    validate_messages(rec["messages"])
    validate_conversation_start(rec["messages"])
    if not any(m["role"] == "assistant" and m["content"] for m in rec["messages"]):
        raise ValueError("messages has no assistant message with non-empty content")
