"""Preference pairs and attribute-scored reward examples: validation, tokenization, collation, demo data.

A preference pair is scored by the log-probability of each response given the prompt, so only the
response tokens count (`assistant_mask`), and prompt turns, including assistant turns inside a
multi-turn prompt, never do. Both sides of n pairs are collated into one batch of 2n rows
`[c_0..c_{n-1}, r_0..r_{n-1}]` so a single forward serves both (the chosen/rejected split is then a
slice, `logps[:n]` / `logps[n:]`).

A reward example is a conversation ending in the response being scored, with HelpSteer2-style
attribute scores; a missing attribute is masked out of the regression, not treated as 0. It is either
the project's `{"messages", "attributes"}` or one of HelpSteer2's own rows as published
(`{"prompt", "response", "helpfulness", ...}`, scores as top-level columns), so the public data needs no
conversion step.
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from trainer.data.chat import TRUNCATION, collate, tokenize_chat
from trainer.data.records import short_repr, validate_conversation_start, validate_messages
from trainer.data.synthetic import TASK_FAMILIES, make_sample, verify
from trainer.losses.reward import HELPSTEER2_ATTRIBUTES  # one definition, shared with the loss

_SIDES = ("chosen", "rejected")
_PAIR_KEYS = frozenset({*_SIDES, "chosen_reward", "rejected_reward"})


# --- validation ------------------------------------------------------------------------------------------


def _check_number(value: object, name: str) -> None:
    # bool is an int subclass; a JSON `true` reward is a mistake, not 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {short_repr(value)}")
    # JSON integers are unbounded; one beyond float range would overflow in float() (and math.isfinite).
    if isinstance(value, int) and abs(value) > sys.float_info.max:
        raise ValueError(f"{name} is too large for a float, got {short_repr(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {short_repr(value)}")


def validate_preference_record(rec: dict) -> None:
    """Check `{"prompt", "chosen", "rejected", "chosen_reward"?, "rejected_reward"?}`; ValueError says why.

    prompt: a string (one user turn) or messages ending in a user turn. chosen/rejected: a string (one
    assistant turn) or assistant messages only, with non-empty content; they must differ (an identical
    pair carries no preference). Rewards are optional but come together, as finite numbers.
    """
    missing = [key for key in ("prompt", *_SIDES) if key not in rec]
    if missing:
        raise ValueError(f"missing key {missing[0]!r} (keys: {', '.join(sorted(rec)) or 'none'})")
    prompt = rec["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("prompt is empty")
    elif isinstance(prompt, list):
        validate_messages(prompt, "prompt")
        if prompt[-1]["role"] != "user":
            raise ValueError(f"prompt must end with a user turn, got {prompt[-1]['role']!r}")
    else:
        raise ValueError(f"prompt must be a string or a list of messages, got {type(prompt).__name__}")
    for side in _SIDES:
        response = rec[side]
        if isinstance(response, str):
            if not response.strip():
                raise ValueError(f"{side} is an empty response")
            continue
        if not isinstance(response, list):
            raise ValueError(f"{side} must be a string or a list of messages, got {type(response).__name__}")
        validate_messages(response, side)
        for i, message in enumerate(response):
            if message["role"] != "assistant":
                raise ValueError(
                    f"{side}[{i}].role must be 'assistant', got {message['role']!r} ({side} holds only the "
                    "response that follows the prompt; put earlier turns in 'prompt')"
                )
            if not message["content"].strip():
                raise ValueError(f"{side}[{i}].content is an empty response")
    _, chosen, rejected = preference_messages(rec)
    if chosen == rejected:
        raise ValueError("chosen and rejected are identical")
    present = [key for key in ("chosen_reward", "rejected_reward") if rec.get(key) is not None]
    for key in present:
        _check_number(rec[key], key)
    if len(present) == 1:
        other = "rejected_reward" if present[0] == "chosen_reward" else "chosen_reward"
        raise ValueError(f"{present[0]} is given but {other} is not; give both rewards or neither")


def preference_messages(rec: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """The (prompt, chosen, rejected) message lists of a valid record; strings become single turns."""

    def as_messages(value: str | list[dict], role: str) -> list[dict]:
        if isinstance(value, str):
            return [{"role": role, "content": value}]
        return [dict(message) for message in value]

    return (as_messages(rec["prompt"], "user"), as_messages(rec["chosen"], "assistant"),
            as_messages(rec["rejected"], "assistant"))


def validate_reward_record(rec: dict, attributes: Sequence[str] = HELPSTEER2_ATTRIBUTES) -> None:
    """Check a reward record against known `attributes`; ValueError says why.

    Two shapes: `{"messages": [..., assistant], "attributes": {name: number}}`, or a HelpSteer2 row
    `{"prompt": str, "response": str, name: number, ...}` (one user turn, the scored response, and the
    scores as top-level columns). A row with "messages" is read as the first shape.
    An attribute may be absent or null (it is masked), but at least one known attribute must be scored.
    An unknown name in the `attributes` object is an error, since it is usually a misspelling whose scores
    would be silently lost; a HelpSteer2 row's other columns are not checked (rows carry more than scores).
    """
    if "messages" in rec or not ("prompt" in rec or "response" in rec):
        _check_reward_conversation(rec, attributes)
    else:
        _check_helpsteer2_row(rec)
    scores = reward_scores(rec, attributes)
    present = [name for name in attributes if scores.get(name) is not None]
    if not present:
        where = "attributes" if "messages" in rec else "the row"
        raise ValueError(f"{where} has no score for any of {', '.join(attributes)}")
    for name in present:
        _check_number(scores[name], f"attributes.{name}" if "messages" in rec else name)


def _check_reward_conversation(rec: dict, attributes: Sequence[str]) -> None:
    if "messages" not in rec:
        raise ValueError(f"missing key 'messages' (or HelpSteer2's 'prompt' and 'response'; keys: "
                         f"{', '.join(sorted(rec)) or 'none'})")
    messages = rec["messages"]
    validate_messages(messages)
    validate_conversation_start(messages)
    if messages[-1]["role"] != "assistant":
        raise ValueError(
            f"messages must end with an assistant turn (the scored response), got {messages[-1]['role']!r}"
        )
    if not messages[-1]["content"].strip():
        raise ValueError(f"messages[{len(messages) - 1}].content is an empty response")
    if "attributes" not in rec:
        raise ValueError("missing key 'attributes'")
    if not isinstance(rec["attributes"], dict):
        raise ValueError(f"attributes must be an object, got {type(rec['attributes']).__name__}")
    unknown = sorted(set(rec["attributes"]) - set(attributes))
    if unknown:
        raise ValueError(f"unknown attribute(s) {', '.join(map(short_repr, unknown))} (known: {', '.join(attributes)})")


def _check_helpsteer2_row(rec: dict) -> None:
    for key in ("prompt", "response"):
        if key not in rec:
            raise ValueError(f"missing key {key!r} (a HelpSteer2 row has 'prompt' and 'response')")
        if not isinstance(rec[key], str):
            raise ValueError(f"{key} must be a string, got {type(rec[key]).__name__}")
    if not rec["prompt"].strip():
        raise ValueError("prompt is empty")
    if not rec["response"].strip():
        raise ValueError("response is empty")


def reward_messages(rec: dict) -> list[dict]:
    """The conversation of a valid reward record; a HelpSteer2 row is one user turn and the response."""
    if "messages" in rec:
        return rec["messages"]
    return [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["response"]}]


def reward_scores(rec: dict, attributes: Sequence[str]) -> dict:
    """The attribute scores of a reward record by name (absent or None: unscored).

    The `attributes` object as given, or a HelpSteer2 row's columns named in `attributes`.
    """
    if "messages" in rec:
        return rec["attributes"]
    return {name: rec[name] for name in attributes if name in rec}


# --- tokenization ------------------------------------------------------------------------------------------


def tokenize_pair(
    tokenizer: PreTrainedTokenizerBase, rec: dict, max_length: int, truncation: str = "right"
) -> dict | None:
    """Tokenize both sides of a valid preference record; None if either side is dropped.

    Returns `{"chosen": {"input_ids", "assistant_mask"}, "rejected": {...}, "chosen_reward",
    "rejected_reward"}` (rewards None when absent). Each side is `prompt + response` through the chat
    template; its mask covers only the response (assistant turns of the prompt are unmasked).

    Longer than `max_length`: "drop" drops the pair. "right" keeps the head; a side whose response is
    cut off entirely (the prompt alone fills `max_length`) is dropped, one cut partway is kept. "left"
    keeps the whole response and removes prompt tokens from the start (system prompt and earliest
    turns first), which leaves a context that begins mid-conversation; if the response does not fit
    with at least one token before it (its first token must have a predecessor to be scored), that
    side, and so the pair, is dropped rather than scoring a partial response.
    """
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATION)}, got {truncation!r}")
    prompt, chosen, rejected = preference_messages(rec)
    out: dict = {}
    for side, response in zip(_SIDES, (chosen, rejected)):
        example = _tokenize_response(tokenizer, prompt, response, max_length, truncation)
        if example is None:
            return None
        out[side] = example
    for key in ("chosen_reward", "rejected_reward"):
        out[key] = None if rec.get(key) is None else float(rec[key])
    return out


def _tokenize_response(
    tokenizer: PreTrainedTokenizerBase, prompt: list[dict], response: list[dict], max_length: int, truncation: str
) -> dict | None:
    full = tokenize_chat(tokenizer, prompt + response, sys.maxsize)
    if full is None:
        return None
    ids, mask = full["input_ids"], list(full["assistant_mask"])
    if any(m["role"] == "assistant" for m in prompt):
        # The prompt ends with a user turn, which is never masked, so cutting at the prompt's own token
        # count is exact even if tokens at the prompt/response seam merge differently in the full text.
        head = tokenize_chat(tokenizer, prompt, sys.maxsize)
        if head is not None:
            mask[: len(head["input_ids"])] = [0] * len(head["input_ids"])
    if len(ids) > max_length:
        if truncation == "drop":
            return None
        if truncation == "right":
            ids, mask = ids[:max_length], mask[:max_length]
        else:
            first = mask.index(1) if 1 in mask else len(mask)
            if len(ids) - first + 1 > max_length:
                return None
            ids, mask = ids[-max_length:], mask[-max_length:]
    if not any(mask):
        return None
    return {"input_ids": ids, "assistant_mask": mask}


def tokenize_reward_example(
    tokenizer: PreTrainedTokenizerBase, rec: dict, attributes: Sequence[str], max_length: int
) -> dict | None:
    """`{"input_ids", "targets", "target_mask"}` of a valid reward record (either shape); None if it cannot fit.

    The reward head reads the last token, so truncation keeps the end: the earliest turns are removed
    first. If the final assistant turn itself does not fit with a token of context before it, None.
    targets hold each attribute's score (0.0 where missing) and target_mask 1.0 where present.
    """
    full = tokenize_chat(tokenizer, reward_messages(rec), sys.maxsize)
    if full is None:
        return None
    ids, mask = full["input_ids"], full["assistant_mask"]
    if len(ids) > max_length:
        # Start of the last run of assistant tokens, i.e. of the final (scored) response.
        start = len(mask) - 1
        while start > 0 and not (mask[start - 1] == 0 and mask[start] == 1):
            start -= 1
        if len(ids) - start + 1 > max_length:
            return None
        ids = ids[-max_length:]
    scores = reward_scores(rec, attributes)
    present = [scores.get(name) is not None for name in attributes]
    return {
        "input_ids": ids,
        "targets": [float(scores[name]) if ok else 0.0 for name, ok in zip(attributes, present)],
        "target_mask": [1.0 if ok else 0.0 for ok in present],
    }


# --- collation ---------------------------------------------------------------------------------------------


def pair_scalars(pairs: list[dict]) -> dict[str, torch.Tensor]:
    """[n] float tensors of the per-pair numbers every pair has (rewards, precomputed reference logps).

    Rewards are carried only if every pair has both; any other key is carried if every pair holds a
    number (or 0-dim tensor) under it, e.g. "ref_chosen"/"ref_rejected".
    """

    def is_scalar(value: object) -> bool:
        if isinstance(value, torch.Tensor):
            return value.ndim == 0
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    out = {}
    rewards = ("chosen_reward", "rejected_reward")
    if all(p.get(key) is not None for p in pairs for key in rewards):
        out.update({key: torch.tensor([float(p[key]) for p in pairs], dtype=torch.float32) for key in rewards})
    extra = set.intersection(*(set(p) for p in pairs)) - _PAIR_KEYS
    for key in sorted(extra):
        if all(is_scalar(p[key]) for p in pairs):
            out[key] = torch.tensor([float(p[key]) for p in pairs], dtype=torch.float32)
    return out


def collate_pairs(pairs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of 2n rows `[c_0..c_{n-1}, r_0..r_{n-1}]` with `chat.collate`'s keys and shift.

    input_ids, labels, loss_mask, attention_mask are [2n, T]; plus the [n] tensors of `pair_scalars`.
    """
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    batch = collate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id)
    return {**batch, **pair_scalars(pairs)}


def collate_reward(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids/attention_mask [B, T], last_index [B], targets/target_mask [B, A].

    No shift: the reward head reads the hidden state at `last_index`, the last real token of each row.
    """
    if not examples:
        raise ValueError("collate_reward needs at least one example")
    lengths = [len(ex["input_ids"]) for ex in examples]
    input_ids = torch.full((len(examples), max(lengths)), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, ex in enumerate(examples):
        input_ids[b, : lengths[b]] = torch.tensor(ex["input_ids"], dtype=torch.long)
        attention_mask[b, : lengths[b]] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "last_index": torch.tensor(lengths, dtype=torch.long) - 1,
        "targets": torch.tensor([ex["targets"] for ex in examples], dtype=torch.float32),
        "target_mask": torch.tensor([ex["target_mask"] for ex in examples], dtype=torch.float32),
    }


# --- synthetic demo data -----------------------------------------------------------------------------------

_WRONG_OPERATOR = {"+": "-", "-": "+", "*": "+"}


def _near_misses(family: str, answer: str, rng: random.Random) -> list[str]:
    """Plausible wrong answers, most plausible first: off-by-one, wrong operator, one slip in a string."""
    if family == "count":
        k = int(answer)
        return [str(k + rng.choice((-1, 1))) if k > 0 else "1", str(k + 1)]
    if family == "code_expr":
        a, op, b = answer.split()
        return [f"{a} {_WRONG_OPERATOR[op]} {b}"]
    if family == "upper":
        i = rng.randrange(len(answer))
        return [answer[:i] + answer[i].lower() + answer[i + 1:]]
    i = rng.randrange(len(answer) - 1)
    swapped = answer[:i] + answer[i + 1] + answer[i] + answer[i + 2:]  # e.g. a partially reversed word
    return [swapped, answer[:-1], answer + answer[-1]]


def _wrong_answer(family: str, prompt: str, answer: str, rng: random.Random) -> str:
    for candidate in _near_misses(family, answer, rng):
        if candidate != answer and not verify(family, prompt, candidate):
            return candidate
    raise RuntimeError(f"no wrong answer found for {family} prompt {prompt!r}")  # unreachable by construction


def _families(families: Sequence[str]) -> list[str]:
    if not families:
        raise ValueError("families must name at least one task family")
    unknown = [name for name in families if name not in TASK_FAMILIES]
    if unknown:
        raise ValueError(f"unknown task family {unknown[0]!r}; known: {', '.join(TASK_FAMILIES)}")
    return list(families)


def synthetic_preference_records(
    n: int, seed: int, families: Sequence[str], with_rewards: bool = True
) -> list[dict]:
    """`n` pairs: chosen = the verified answer, rejected = a near miss that `verify` rejects.

    Rewards are the verifier's verdicts (1.0 / 0.0). Identical for identical arguments.
    """
    names = _families(families)
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        name = rng.choice(names)
        prompt, answer = make_sample(name, rng)
        wrong = _wrong_answer(name, prompt, answer, rng)
        record = {
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": answer}],
            "rejected": [{"role": "assistant", "content": wrong}],
            "family": name,
        }
        if with_rewards:
            record["chosen_reward"] = float(verify(name, prompt, answer))
            record["rejected_reward"] = float(verify(name, prompt, wrong))
        records.append(record)
    return records


def synthetic_reward_records(n: int, seed: int, families: Sequence[str]) -> list[dict]:
    """`n` scored responses (correct, near miss, or the answer said twice) with learnable attributes.

    Every attribute is a fixed function of what a model can see: correctness 4 if verified, 1 for a
    near miss of the answer's length, else 0; helpfulness tracks correctness; coherence 4 unless the
    answer is repeated; complexity from the prompt's length, verbosity from the response's. One record
    in five omits one attribute, so the masked case is exercised. Identical for identical arguments.
    """
    names = _families(families)
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        name = rng.choice(names)
        prompt, answer = make_sample(name, rng)
        kind = rng.choice(("correct", "near_miss", "repeated"))
        response = {"correct": answer, "near_miss": _wrong_answer(name, prompt, answer, rng),
                    "repeated": f"{answer} {answer}"}[kind]
        ok = verify(name, prompt, response)
        correctness = 4.0 if ok else (1.0 if len(response) == len(answer) else 0.0)
        attributes = {
            "helpfulness": 4.0 if ok else correctness / 2,
            "correctness": correctness,
            "coherence": 2.0 if kind == "repeated" else 4.0,
            "complexity": float(min(4, len(prompt) // 8)),
            "verbosity": float(min(4, len(response) // 3)),
        }
        if rng.random() < 0.2:
            del attributes[rng.choice(HELPSTEER2_ATTRIBUTES)]
        records.append({
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
            "attributes": attributes,
            "family": name,
        })
    return records
