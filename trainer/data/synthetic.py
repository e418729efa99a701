"""Deterministic synthetic chat tasks whose answers a program can check.

Why: a demo recipe must train and *evaluate* on a laptop CPU in minutes, with no downloads. Each task
family is tiny (prompts under ~40 characters, answers a few tokens) so a small model learns it fast,
and each answer is checkable by `verify`, which gives the demo a real accuracy metric and a reward
signal for preference data without a reward model.

Every random choice goes through a `random.Random(seed)` passed in explicitly (never the global RNG,
never `hash()`, which is salted per process), so the same (n, seed, families) gives identical records
on every machine and every rank of a distributed job.
"""

from __future__ import annotations

import ast
import json
import operator
import os
import random
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# Chat markers of the embedded tokenizer's template; listed here so the tokenizer corpus contains them.
CHAT_MARKERS: tuple[str, ...] = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

_LETTERS = string.ascii_lowercase
# `count` draws from a small alphabet so the asked-for letter occurs a varied number of times.
_COUNT_ALPHABET = "abcdef"


def _word(rng: random.Random, lo: int, hi: int, alphabet: str = _LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _swap_pairs(word: str) -> str:
    """Swap characters 0<->1, 2<->3, ...; an odd last character stays in place."""
    chars = list(word)
    for i in range(0, len(chars) - 1, 2):
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
    return "".join(chars)


def _after(prompt: str, marker: str) -> str:
    """The argument of a prompt `"<marker><arg>"`; ValueError if the prompt is not of that family."""
    if not prompt.startswith(marker):
        raise ValueError(f"prompt {prompt!r} does not start with {marker!r}")
    return prompt[len(marker):]


@dataclass(frozen=True)
class TaskFamily:
    """A task: `make(rng) -> (prompt, answer)` and `check(prompt, response) -> bool`."""

    name: str
    make: Callable[[random.Random], tuple[str, str]]
    check: Callable[[str, str], bool]


def _string_task(name: str, marker: str, fn: Callable[[str], str], lo: int, hi: int) -> TaskFamily:
    """A family `"<marker><word>" -> fn(word)`, checked by recomputing fn from the prompt."""
    return TaskFamily(
        name=name,
        make=lambda rng: (f"{marker}{(w := _word(rng, lo, hi))}", fn(w)),
        check=lambda prompt, response: response == fn(_after(prompt, marker)),
    )


# --- count ------------------------------------------------------------------------------------------
_COUNT_MARKER = "Count "


def _make_count(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, 4, 8, _COUNT_ALPHABET)
    letter = rng.choice(_COUNT_ALPHABET)
    return f"{_COUNT_MARKER}{letter} in {word}", str(word.count(letter))


def _check_count(prompt: str, response: str) -> bool:
    letter, sep, word = _after(prompt, _COUNT_MARKER).partition(" in ")
    if not sep or len(letter) != 1:
        raise ValueError(f"prompt {prompt!r} is not a count task")
    return response == str(word.count(letter))


# --- code_expr: "Python expression: add 3 and 4" -> "3 + 4", verified by safe evaluation -------------
_CODE_MARKER = "Python expression: "
_CODE_OPS: dict[str, tuple[type[ast.operator], Callable[[int, int], int], str]] = {
    "add": (ast.Add, operator.add, "+"),
    "subtract": (ast.Sub, operator.sub, "-"),
    "multiply": (ast.Mult, operator.mul, "*"),
}


def _make_code_expr(rng: random.Random) -> tuple[str, str]:
    verb = rng.choice(sorted(_CODE_OPS))
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    # "subtract a from b" reads naturally and makes operand order matter: the answer is `b - a`.
    if verb == "subtract":
        return f"{_CODE_MARKER}subtract {a} from {b}", f"{b} - {a}"
    return f"{_CODE_MARKER}{verb} {a} and {b}", f"{a} {_CODE_OPS[verb][2]} {b}"


def _safe_eval(node: ast.AST) -> int:
    """Evaluate an int-only arithmetic AST; anything else (names, calls, floats) is rejected."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_safe_eval(node.operand)
    if isinstance(node, ast.BinOp):
        for op_type, fn, _ in _CODE_OPS.values():
            if isinstance(node.op, op_type):
                return fn(_safe_eval(node.left), _safe_eval(node.right))
    raise ValueError(f"unsupported expression node {type(node).__name__}")


def _check_code_expr(prompt: str, response: str) -> bool:
    words = _after(prompt, _CODE_MARKER).split()
    if len(words) != 4 or words[0] not in _CODE_OPS or not all(w.isdigit() for w in words[1::2]):
        raise ValueError(f"prompt {prompt!r} is not a code_expr task")
    verb, a, b = words[0], int(words[1]), int(words[3])
    op_type, fn, _ = _CODE_OPS[verb]
    expected = fn(b, a) if verb == "subtract" else fn(a, b)
    try:
        tree = ast.parse(response, mode="eval").body
        # The expression must *perform* the asked operation: a bare "7" evaluates right but is no code.
        return isinstance(tree, ast.BinOp) and isinstance(tree.op, op_type) and _safe_eval(tree) == expected
    except (SyntaxError, ValueError, RecursionError):
        return False


TASK_FAMILIES: dict[str, TaskFamily] = {
    family.name: family
    for family in (
        _string_task("reverse", "Reverse: ", lambda w: w[::-1], 3, 6),
        _string_task("sort", "Sort: ", lambda w: "".join(sorted(w)), 3, 5),
        _string_task("upper", "Upper: ", str.upper, 3, 6),
        _string_task("copy", "Copy: ", lambda w: w, 3, 6),
        _string_task("swap_pairs", "Swap pairs: ", _swap_pairs, 4, 6),
        TaskFamily("count", _make_count, _check_count),
        TaskFamily("code_expr", _make_code_expr, _check_code_expr),
    )
}


def _family(name: str) -> TaskFamily:
    if name not in TASK_FAMILIES:
        raise ValueError(f"unknown task family {name!r}; known: {', '.join(TASK_FAMILIES)}")
    return TASK_FAMILIES[name]


def make_sample(family: str, rng: random.Random) -> tuple[str, str]:
    """One (prompt, answer) pair of `family`, drawn from `rng`."""
    return _family(family).make(rng)


def generate_chat_records(n: int, seed: int, families: Sequence[str]) -> list[dict]:
    """`n` single-turn chat records, families drawn uniformly; identical for identical arguments."""
    if not families:
        raise ValueError("families must name at least one task family")
    names = [_family(name).name for name in families]
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        name = rng.choice(names)
        prompt, answer = make_sample(name, rng)
        records.append(
            {
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": answer},
                ],
                "family": name,
            }
        )
    return records


def verify(family: str, prompt: str, response: str) -> bool:
    """Whether `response` (surrounding whitespace ignored) correctly answers `prompt`."""
    return _family(family).check(prompt, response.strip())


CORPORA = ("tasks", "longwriter")


def corpus_text(seed: int = 0, n: int = 4000, corpus: str = "tasks") -> list[str]:
    """Lines for training a tokenizer: samples of every family plus the chat template's markers, and
    for ``corpus="longwriter"`` English LongWriter-style instructions and prose as well (so a tiny
    model writes words, not letters: trainer/curation/longwriter_data.py).

    Prompts and answers are separate lines because in a rendered chat each starts right after a
    newline (no leading space), which is how the tokenizer will later see them.
    """
    if corpus not in CORPORA:
        raise ValueError(f"model.embedded_corpus: must be one of {', '.join(CORPORA)}; got {corpus!r}")
    rng = random.Random(seed)
    names = list(TASK_FAMILIES)
    lines = [" ".join(CHAT_MARKERS), "system user assistant"]
    for i in range(n):
        prompt, answer = make_sample(names[i % len(names)], rng)
        lines += [prompt, answer]
    if corpus == "longwriter":
        from trainer.curation.longwriter_data import generate  # curation builds on data, not the reverse

        records, _ = generate(200, seed, p_chinese=0.0, min_required=100, max_required=300)
        lines += [m["content"] for r in records for m in r["messages"]]
    return lines


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Write records one JSON object a line, atomically: readers never see a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
