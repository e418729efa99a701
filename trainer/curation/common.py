"""What every curation tool shares: reading inputs as training does, record views, options, drops.

Reading goes through `trainer.data.records.read_jsonl_lines`, so a bad record is the same
`path:line: reason` DataError a training run would raise (exit code 2), or a counted skip under
`on_bad_record="skip"`. Each record is one of four kinds, told apart by its keys:

    chat         {"messages": [...]}                         (also the reward format with "attributes")
    row          {"prompt": str, "response": str, ...}       (HelpSteer2's own rows)
    preference   {"prompt", "chosen", "rejected", ...}       (DESIGN.md's preference format)
    candidates   {"prompt", "responses": [r1, r2, ...]}      (several responses to one prompt, to judge)

A tool says which kinds it reads; any other kind is a bad record naming its line, not a crash later.
Every view below (prompt, responses, texts) is a pure function of a validated record.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trainer.data.preference import validate_preference_record
from trainer.data.records import (ON_BAD_RECORD, read_jsonl_lines, short_repr, validate_chat_record,
                                  validate_messages)
from trainer.runtime.errors import BadInput

KINDS = ("chat", "row", "preference", "candidates")
_KIND_KEYS = {"chat": '{"messages"}', "row": '{"prompt", "response"}',
              "preference": '{"prompt", "chosen", "rejected"}', "candidates": '{"prompt", "responses"}'}


@dataclass(frozen=True)
class Row:
    """One valid record and where it came from (`path:line` in every report example)."""

    path: Path
    lineno: int
    record: dict
    kind: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.lineno}"


@dataclass
class Inputs:
    rows: list[Row]
    bad_records: int
    bad_by_file: dict[str, int]


@dataclass
class Result:
    """What a tool's `run` returns: the records to write (None: the tool keeps none, e.g. stats), its
    own report fields, the lines of its report.md section, the PNGs it wrote, a one-line summary."""

    kept: list[dict] | None
    report: dict
    summary: str
    lines: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)


# --- kinds and validation ----------------------------------------------------------------------------------


def record_kind(rec: dict) -> str:
    """The kind of a record by its keys; ValueError (a bad record) when it is none of them."""
    if "messages" in rec:
        return "chat"
    if "chosen" in rec or "rejected" in rec:
        return "preference"
    if "responses" in rec:
        return "candidates"
    if "response" in rec:
        return "row"
    raise ValueError("not a chat, prompt/response row, preference or candidates record: expected "
                     + " / ".join(_KIND_KEYS.values()) + f" (keys: {', '.join(sorted(rec)) or 'none'})")


def _validate_prompt(prompt: object) -> None:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("prompt is empty")
        return
    validate_messages(prompt, "prompt")
    if prompt[-1]["role"] != "user":
        raise ValueError(f"prompt must end with a user turn, got {prompt[-1]['role']!r}")


def _validate_response(response: object, name: str) -> None:
    if isinstance(response, str):
        if not response.strip():
            raise ValueError(f"{name} is an empty response")
        return
    validate_messages(response, name)
    for i, message in enumerate(response):
        if message["role"] != "assistant":
            raise ValueError(f"{name}[{i}].role must be 'assistant', got {short_repr(message['role'])}")


def _validate_row(rec: dict) -> None:
    for key in ("prompt", "response"):
        if key not in rec:
            raise ValueError(f"missing key {key!r} (a prompt/response row has both)")
        if not isinstance(rec[key], str) or not rec[key].strip():
            raise ValueError(f"{key} must be a non-empty string, got {short_repr(rec[key])}")


def _validate_candidates(rec: dict) -> None:
    if "prompt" not in rec:
        raise ValueError("missing key 'prompt'")
    _validate_prompt(rec["prompt"])
    responses = rec["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise ValueError(f"responses must be a list of at least 2 responses, got {short_repr(responses)}")
    for i, response in enumerate(responses):
        _validate_response(response, f"responses[{i}]")


_VALIDATORS: dict[str, Callable[[dict], None]] = {
    "chat": validate_chat_record, "row": _validate_row, "preference": validate_preference_record,
    "candidates": _validate_candidates}


def validator(tool: str, kinds: Sequence[str]) -> Callable[[dict], None]:
    """A record validator for `read_jsonl_lines` that accepts only `kinds`."""

    def validate(rec: dict) -> None:
        kind = record_kind(rec)
        if kind not in kinds:
            raise ValueError(f"a {kind} record; {tool} reads {', '.join(kinds)} records")
        _VALIDATORS[kind](rec)

    return validate


def read_inputs(paths: Sequence[str | Path], tool: str, kinds: Sequence[str], on_bad_record: str,
                what: str = "input") -> Inputs:
    """Every valid record of every file in order, as Rows; a missing file or no file is BadInput."""
    if not paths:
        raise BadInput(f"{tool}: no {what} file given")
    check = validator(tool, kinds)
    rows, bad, by_file = [], 0, {}
    for path in map(Path, paths):
        if not path.is_file():
            raise BadInput(f"{path}: {what} file not found")
        lines, skipped = read_jsonl_lines(path, check, on_bad_record)
        rows += [Row(path, lineno, rec, record_kind(rec)) for lineno, rec in lines]
        bad += skipped
        by_file[str(path)] = skipped
    return Inputs(rows, bad, by_file)


# --- views -------------------------------------------------------------------------------------------------


def _as_messages(value: str | list[dict], role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else [dict(m) for m in value]


def prompt_and_responses(rec: dict) -> tuple[list[dict], list[list[dict]]]:
    """(prompt messages, [each response's messages]) of a valid record of any kind.

    chat: the prompt is every turn before the last assistant turn, the response that turn (turns after
    it, if any, are not part of either). preference: [chosen, rejected]. candidates: the responses.
    """
    if "messages" in rec:
        messages = rec["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return [dict(m) for m in messages[:last]], [[dict(messages[last])]]
    prompt = _as_messages(rec["prompt"], "user")
    if "chosen" in rec:
        return prompt, [_as_messages(rec["chosen"], "assistant"), _as_messages(rec["rejected"], "assistant")]
    if "responses" in rec:
        return prompt, [_as_messages(r, "assistant") for r in rec["responses"]]
    return prompt, [_as_messages(rec["response"], "assistant")]


def messages_text(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages)


def instruction(rec: dict) -> str:
    """The last user turn before the (first) response: where a length requirement is written."""
    prompt, _ = prompt_and_responses(rec)
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else ""


def response_text(rec: dict) -> str:
    """The text of the first response: a chat's last assistant turn, a pair's chosen side."""
    return messages_text(prompt_and_responses(rec)[1][0])


def key_text(rec: dict, key: str) -> str:
    """The text dedup and select compare: the prompt, or the whole conversation (every response)."""
    prompt, responses = prompt_and_responses(rec)
    if key == "prompt":
        return messages_text(prompt)
    return "\n".join([messages_text(prompt), *map(messages_text, responses)])


def conversations(rec: dict) -> list[list[dict]]:
    """Each full conversation a record holds: prompt + each response."""
    prompt, responses = prompt_and_responses(rec)
    return [prompt + response for response in responses]


def prompt_id(rec: dict) -> str:
    """A canonical string of the prompt, so records answering the same prompt group together."""
    return json.dumps(prompt_and_responses(rec)[0], sort_keys=True, ensure_ascii=False)


# --- options -----------------------------------------------------------------------------------------------


def option(default, help: str, type=None, choices: Sequence[str] | None = None, many: bool = False):
    """A tool option: a dataclass field whose metadata is also its CLI flag (`snake_name` -> `--snake-name`).

    `type` converts a CLI string (and checks a library value); `many`: a list, the flag repeatable.
    """
    meta = {"help": help, "type": type or (default.__class__ if default is not None else str),
            "choices": choices, "many": many}
    if many:
        return field(default_factory=lambda: list(default or []), metadata=meta)
    return field(default=default, metadata=meta)


def on_bad_record_option():
    return option("error", "a malformed record: stop with file:line (error) or skip and count it (skip)",
                  choices=ON_BAD_RECORD)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def bad_option(tool: str, name: str, message: str) -> BadInput:
    """BadInput naming the option both ways: the CLI flag and the library's options key."""
    return BadInput(f"{tool}: {flag(name)} (options.{name}) {message}")


def _coerce(tool: str, f: dataclasses.Field, value):
    kind, many = f.metadata["type"], f.metadata["many"]
    if many:
        if isinstance(value, (str, Path)) or not hasattr(value, "__iter__"):
            value = [value]
        return [_coerce_one(tool, f, kind, v) for v in value]
    return None if value is None else _coerce_one(tool, f, kind, value)


def _coerce_one(tool: str, f: dataclasses.Field, kind, value):
    if kind is bool:
        if not isinstance(value, bool):
            raise bad_option(tool, f.name, f"must be true or false, got {short_repr(value)}")
    elif kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise bad_option(tool, f.name, f"must be a{'n integer' if kind is int else ' number'}, "
                                           f"got {short_repr(value)}")
        value = kind(value)
    else:
        value = str(value)
    choices = f.metadata["choices"]
    if choices and value not in choices:
        raise bad_option(tool, f.name, f"must be one of {', '.join(choices)}, got {short_repr(value)}")
    return value


def parse_options(cls, tool: str, options: dict | None):
    """The tool's Options from a library call's dict: unknown keys and wrong types are BadInput."""
    options = dict(options or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise BadInput(f"{tool}: unknown option(s) {', '.join(unknown)} (known: {', '.join(names)})")
    return cls(**{name: _coerce(tool, names[name], value) for name, value in options.items()})


# --- drops -------------------------------------------------------------------------------------------------


@dataclass
class Drops:
    """Counts of dropped records per reason, with the first `limit` of each quoted for the report."""

    limit: int = 5
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[dict]] = field(default_factory=dict)

    def add(self, row: Row, reason: str, **details) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        quoted = self.examples.setdefault(reason, [])
        if len(quoted) < self.limit:
            quoted.append({"where": row.where, **details})


def excerpt(text: str, limit: int = 160) -> str:
    """A one-line excerpt for a report."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
