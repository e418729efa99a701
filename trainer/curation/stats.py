"""What a dataset holds before it is trained on: lengths, turns, roles, language mix, bad records.

Lengths are of each conversation a record holds (a chat: up to its last assistant turn; a preference
pair: prompt + chosen and prompt + rejected; candidates: prompt + each response) and of each response
alone. With ``tokenizer`` (a local Hugging Face tokenizer directory) they are tokens of the
conversation rendered by the tokenizer's chat template, exactly what `data.max_length` is compared
with in training (a response alone: its text's tokens, without the template's framing). Without one
they are LongWriter words (`trainer.data.produced_length`: English words plus CJK ideographs), the
length filter's unit.

Language mix, per record over all its text: the share s = CJK ideographs / (CJK ideographs + Latin
letters). s >= 0.8 is ``cjk``, s <= 0.2 ``latin``, between them ``mixed``, no letter at all ``none``.
Letters, not words, are counted, so one English word weighs about five ideographs: a share, not a
word ratio. Bad records are the lines skipped under ``--on-bad-record skip``, per file.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from trainer.curation.common import (Inputs, Result, bad_option, messages_text, on_bad_record_option, option,
                                     prompt_and_responses)
from trainer.curation.report import histogram, plot_histogram, quantiles
from trainer.curation.text import script_counts
from trainer.data.length import produced_length

NAME = "stats"
SUMMARY = "dataset statistics: length histograms, turns, roles, language mix, bad records"
PLOT = "lengths.png"


@dataclass
class Options:
    tokenizer: str = option(None, "local tokenizer directory: lengths in its tokens (default: LongWriter words)",
                            type=str)
    bins: int = option(20, "histogram bins")
    plot: bool = option(True, f"write {PLOT} (conversation length histogram)")
    on_bad_record: str = on_bad_record_option()


def kinds(options: Options) -> tuple[str, ...]:
    return ("chat", "row", "preference", "candidates")


def language(text: str) -> str:
    """cjk / latin / mixed / none by the CJK share of letters (module docstring)."""
    cjk, latin = script_counts(text)
    if cjk + latin == 0:
        return "none"
    share = cjk / (cjk + latin)
    return "cjk" if share >= 0.8 else "latin" if share <= 0.2 else "mixed"


def _length_fns(options: Options):
    """(unit, length of a conversation, length of a response's text)."""
    if options.tokenizer is None:
        words = lambda messages: produced_length(messages_text(messages))  # noqa: E731
        return "words", words, words
    from trainer.data.chat import tokenize_chat
    from trainer.data.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(options.tokenizer)
    except (OSError, ValueError) as err:
        raise bad_option(NAME, "tokenizer", f"cannot be loaded: {err}") from None

    def conversation(messages: list[dict]) -> int:
        example = tokenize_chat(tokenizer, messages, sys.maxsize)
        return 0 if example is None else len(example["input_ids"])

    def response(messages: list[dict]) -> int:  # the text alone, without the template's framing
        return len(tokenizer(messages_text(messages), add_special_tokens=False)["input_ids"])

    return "tokens", conversation, response


def run(inputs: Inputs, options: Options, output_dir: Path) -> Result:
    if options.bins < 1:
        raise bad_option(NAME, "bins", f"must be positive, got {options.bins}")
    unit, conversation_length, response_length = _length_fns(options)
    kinds_seen, turns, roles, languages = Counter(), Counter(), Counter(), Counter()
    conv_lengths, response_lengths = [], []
    cjk_total = latin_total = 0
    for row in inputs.rows:
        prompt, responses = prompt_and_responses(row.record)
        kinds_seen[row.kind] += 1
        turns[len(prompt) + len(responses[0])] += 1
        roles.update(m["role"] for m in prompt)
        for response in responses:
            roles.update(m["role"] for m in response)
            conv_lengths.append(conversation_length(prompt + response))
            response_lengths.append(response_length(response))
        text = "\n".join([messages_text(prompt), *map(messages_text, responses)])
        cjk, latin = script_counts(text)
        cjk_total, latin_total = cjk_total + cjk, latin_total + latin
        languages[language(text)] += 1
    report = {"unit": unit, "kinds": dict(sorted(kinds_seen.items())), "turns": dict(sorted(turns.items())),
              "roles": dict(sorted(roles.items())),
              "conversation_length": {**quantiles(conv_lengths), "histogram": histogram(conv_lengths, options.bins)},
              "response_length": {**quantiles(response_lengths),
                                  "histogram": histogram(response_lengths, options.bins)},
              "language": dict(sorted(languages.items())),
              "cjk_share": cjk_total / (cjk_total + latin_total) if cjk_total + latin_total else None}
    plots = []
    if options.plot and conv_lengths:
        plot_histogram(output_dir / PLOT, {"conversation": conv_lengths, "response": response_lengths},
                       f"length ({unit})", log_x=min(conv_lengths + response_lengths) > 0)
        plots.append(PLOT)

    def fmt(q: dict) -> str:
        return ", ".join(f"{k} {v:.1f}" if k == "mean" else f"{k} {v}" for k, v in q.items() if k != "histogram")

    lines = [f"- kinds: {report['kinds']}", f"- messages per conversation: {report['turns']}",
             f"- roles: {report['roles']}", f"- conversation length ({unit}): {fmt(report['conversation_length'])}",
             f"- response length ({unit}): {fmt(report['response_length'])}",
             f"- language (CJK share of letters): {report['language']}"
             + (f", overall CJK share {report['cjk_share']:.3f}" if report["cjk_share"] is not None else ""),
             f"- bad records: {inputs.bad_records} " + str(inputs.bad_by_file)]
    summary = (f"{NAME}: {len(inputs.rows)} records, {inputs.bad_records} bad, {len(conv_lengths)} conversations, "
               f"median length {report['conversation_length'].get('p50', 0)} {unit}")
    return Result(None, report, summary, lines, plots)
