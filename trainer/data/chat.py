"""Chat templating, assistant loss masks and batch collation.

The loss mask must cover exactly what the model will have to generate at inference: the content of
every assistant turn and its end-of-turn marker (so it learns to stop), never the system/user turns
or the assistant header (the template supplies those). It is derived from the tokenizer's own chat
template, so it works for any Hugging Face template, not only for templates annotated with
`{% generation %}` (which `return_assistant_tokens_mask` requires):

1. Character spans. For assistant message i, `render(messages[:i], add_generation_prompt=True)` ends
   where its content starts, and `render(messages[:i+1])` ends after its end-of-turn marker. Trailing
   whitespace after the marker is template formatting that inference never generates (decoding stops
   at eos), so it is left out. This is sound only if each such rendering is a prefix of the full one
   ("prefix-stable"); that is checked, and a template that is not raises an error naming the
   tokenizer and the fix.
   One departure is accepted: a conversation terminator, special tokens that the template appends
   after the last message only when no generation prompt follows (Phi-3 ends with `{{ eos_token }}`).
   It is found by rendering the whole conversation with and without the generation prompt, removed
   from every turn's rendering before the prefix check, and left out of the mask: the model stops at
   its end-of-turn marker and never generates it.
2. Tokens. A fast tokenizer's offset mapping says which characters each token covers; a token is in
   the mask if it lies between the first and the last token overlapping the span (so a whitespace
   token whose offsets a tokenizer trims to empty, inside the content, is still learned). For a slow
   tokenizer, the token count of the encoded text prefix gives the boundary, after checking that the
   prefix's encoding is a prefix of the full encoding.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

TRUNCATION = ("right", "left", "drop")


class TemplateError(ValueError):
    """A chat template the loss mask cannot be derived from (not prefix-stable)."""


def tokenize_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_length: int, truncation: str = "right"
) -> dict | None:
    """Tokenize a conversation with its assistant mask; None if it has no trainable token left.

    truncation when longer than `max_length`: "right" keeps the head, "left" keeps the tail (the
    last turns), "drop" returns None. Returns `{"input_ids": [...], "assistant_mask": [...]}`.
    """
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATION)}, got {truncation!r}")
    text = _render(tokenizer, messages, add_generation_prompt=False)
    spans = _assistant_char_spans(tokenizer, messages, text)
    # Templates that already emit BOS (Llama 3, Mistral) must not get a second one from the tokenizer.
    bos = tokenizer.bos_token
    add_special_tokens = not (bos and text.startswith(bos))
    if tokenizer.is_fast:
        input_ids, mask = _mask_from_offsets(tokenizer, text, spans, add_special_tokens)
    else:
        input_ids, mask = _mask_from_prefixes(tokenizer, text, spans, add_special_tokens)

    if len(input_ids) > max_length:
        if truncation == "drop":
            return None
        keep = slice(0, max_length) if truncation == "right" else slice(len(input_ids) - max_length, None)
        input_ids, mask = input_ids[keep], mask[keep]
    if not any(mask):
        return None
    return {"input_ids": input_ids, "assistant_mask": mask}


def tokenize_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """Token ids of a conversation prefix followed by the assistant header: what a model generates from."""
    text = _render(tokenizer, messages, add_generation_prompt=True)
    bos = tokenizer.bos_token
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises many types; say which conversation prefix failed
        raise TemplateError(
            f"chat template failed on the first {len(messages)} message(s) "
            f"(add_generation_prompt={add_generation_prompt}): {e}"
        ) from e
    if not isinstance(text, str):
        raise TemplateError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str")
    return text


def _assistant_char_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], text: str
) -> list[tuple[int, int]]:
    """[start, end) character spans of each assistant turn's content + end-of-turn marker in `text`."""
    terminator = _conversation_terminator(tokenizer, messages, text)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        header = _render(tokenizer, messages[:i], add_generation_prompt=True)
        turn = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if terminator:
            turn = turn.removesuffix(terminator)
        if not (turn.startswith(header) and text.startswith(turn)):
            raise _not_prefix_stable(tokenizer, i)
        start, end = len(header), len(turn.rstrip())
        if end > start:
            spans.append((start, end))
    return spans


def _conversation_terminator(tokenizer: PreTrainedTokenizerBase, messages: list[dict], text: str) -> str:
    """The special token the template appends after the last message only when no generation prompt
    follows (Phi-3: `{% else %}{{ eos_token }}`), or "" when it appends none.

    Such a token makes every shorter rendering end with it where the full one goes on, so the prefix
    check must ignore it. It is recognised only when `text` minus one trailing special token is a
    prefix of the same conversation rendered with the generation prompt: anything else that differs
    (text, or a token mid-conversation) is still refused as not prefix-stable.
    """
    try:
        prompted = _render(tokenizer, messages, add_generation_prompt=True)
    except TemplateError:  # a template may refuse a generation prompt after an assistant turn
        return ""
    if prompted.startswith(text):
        return ""
    stripped = text.rstrip()
    for special in sorted(set(tokenizer.all_special_tokens), key=len, reverse=True):
        if special and stripped.endswith(special) and prompted.startswith(stripped[: -len(special)]):
            return text[len(stripped) - len(special):]
    return ""


def _not_prefix_stable(tokenizer: PreTrainedTokenizerBase, i: int) -> TemplateError:
    """The refusal, naming where the template came from and what to change."""
    source = tokenizer.name_or_path or "an in-memory tokenizer"
    return TemplateError(
        f"chat template of {source} is not prefix-stable at messages[{i}]: rendering messages[:{i + 1}] "
        f"(and messages[:{i}] with the generation prompt) does not give a prefix of the full conversation's "
        "rendering, beyond a special token appended at the very end, so assistant tokens cannot be "
        "located. Set model.tokenizer to a tokenizer directory whose chat template is prefix-stable, or "
        f"replace `chat_template` in {source}'s tokenizer_config.json (or chat_template.jinja) with a "
        "template where each rendered conversation prefix is a prefix of the whole conversation"
    )


def _mask_from_offsets(
    tokenizer: PreTrainedTokenizerBase, text: str, spans: list[tuple[int, int]], add_special_tokens: bool
) -> tuple[list[int], list[int]]:
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    input_ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    mask = [0] * len(input_ids)
    for a, b in spans:
        # Tokens with empty offsets (added BOS/EOS) never overlap; they can still fall between first and last.
        overlapping = [t for t, (s, e) in enumerate(offsets) if s < b and e > a]
        if not overlapping:
            raise TemplateError(f"no token covers assistant characters [{a}, {b}) of the rendered chat")
        for t in range(overlapping[0], overlapping[-1] + 1):
            mask[t] = 1
    return input_ids, mask


def _mask_from_prefixes(
    tokenizer: PreTrainedTokenizerBase, text: str, spans: list[tuple[int, int]], add_special_tokens: bool
) -> tuple[list[int], list[int]]:
    input_ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def boundary(char: int) -> int:
        prefix = tokenizer.encode(text[:char], add_special_tokens=add_special_tokens)
        if input_ids[: len(prefix)] != prefix:
            raise TemplateError(
                f"tokenization is not prefix-stable at character {char} of the rendered chat: encoding "
                "the prefix gives different tokens than the full text; use a fast tokenizer"
            )
        return len(prefix)

    mask = [0] * len(input_ids)
    for a, b in spans:
        for t in range(boundary(a), boundary(b)):
            mask[t] = 1
    return input_ids, mask


def collate(examples: list[dict], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad tokenized examples and shift them into (inputs, labels aligned to logits).

    With L = max length (or `pad_to`) and T = L - 1: `input_ids[b, t] = tokens[t]`,
    `labels[b, t] = tokens[t + 1]` so `logits[:, t]` predicts `labels[:, t]`, and
    `loss_mask[b, t] = assistant_mask[t + 1]` (float; 0 on padding, whose labels hold `pad_id`).
    `attention_mask` (long) is 1 on real input tokens.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    longest = max(len(ex["input_ids"]) for ex in examples)
    length = longest if pad_to is None else pad_to
    if length < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest example ({longest} tokens)")
    if length < 2:
        raise ValueError("sequences need at least 2 tokens to form one (input, label) pair")
    tokens = torch.full((len(examples), length), pad_id, dtype=torch.long)
    assistant = torch.zeros((len(examples), length), dtype=torch.float32)
    real = torch.zeros((len(examples), length), dtype=torch.long)
    for b, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if len(ex["assistant_mask"]) != n:
            raise ValueError(f"example {b}: input_ids and assistant_mask lengths differ")
        tokens[b, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        assistant[b, :n] = torch.tensor(ex["assistant_mask"], dtype=torch.float32)
        real[b, :n] = 1
    return {
        "input_ids": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": assistant[:, 1:].contiguous(),
        "attention_mask": real[:, :-1].contiguous(),
    }
