"""Reading JSONL records with validation that names the file and line of every bad record.

Why: a malformed record found mid-run on rank 37 of a cluster job is expensive. Reading validates
every record up front, and every complaint starts with `path:line:` so it can be fixed in an editor.
Whether a bad record stops the run or is skipped and counted is the config's choice (`on_bad_record`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

ON_BAD_RECORD = ("error", "skip")
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A bad record; the message always starts with `f"{path}:{lineno}: "`."""


def read_jsonl(
    path: str | Path, validate: Callable[[dict], None], on_bad_record: str = "error"
) -> tuple[list[dict], int]:
    """Read one JSON object a line (blank lines ignored) and validate each.

    A line that is not JSON, not an object, or that `validate` rejects with ValueError raises
    DataError under `on_bad_record="error"`; under `"skip"` it is logged once and counted.
    Returns (records, n_skipped).
    """
    if on_bad_record not in ON_BAD_RECORD:
        raise ValueError(f"on_bad_record must be one of {', '.join(ON_BAD_RECORD)}, got {on_bad_record!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    records: list[dict] = []
    n_skipped = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            result = _check_line(line, validate)
            if isinstance(result, dict):
                records.append(result)
                continue
            message = f"{path}:{lineno}: {result}"
            if on_bad_record == "error":
                raise DataError(message)
            logger.warning("skipping bad record: %s", message)
            n_skipped += 1
    return records, n_skipped


def _check_line(line: str, validate: Callable[[dict], None]) -> dict | str:
    """The parsed record, or the reason it is bad."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return f"invalid JSON: {e}"
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    try:
        validate(record)
    except ValueError as e:
        return str(e)
    return record


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
            raise ValueError(f"{where}.role must be one of {', '.join(ROLES)}, got {message['role']!r}")
        if "content" not in message:
            raise ValueError(f"{where} has no 'content'")
        if not isinstance(message["content"], str):
            raise ValueError(f"{where}.content must be a string, got {type(message['content']).__name__}")


def validate_chat_record(rec: dict) -> None:
    """Check the chat/SFT format: `{"messages": [...]}` with at least one non-empty assistant turn.

    Without a non-empty assistant message the record has no token to compute the SFT loss on.
    """
    if "messages" not in rec:
        raise ValueError(f"missing key 'messages' (keys: {', '.join(sorted(rec)) or 'none'})")
    validate_messages(rec["messages"])
    if not any(m["role"] == "assistant" and m["content"] for m in rec["messages"]):
        raise ValueError("messages has no assistant message with non-empty content")
