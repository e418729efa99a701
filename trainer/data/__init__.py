"""Data: JSONL formats, synthetic demo tasks, tokenizers, chat templating with loss masks, collation."""

from trainer.data.curation import length_score
from trainer.data.length import produced_length, required_length
from trainer.data.chat import TemplateError, collate, tokenize_chat, tokenize_prompt
from trainer.data.records import DataError, read_jsonl, validate_chat_record, validate_messages
from trainer.data.synthetic import (
    TASK_FAMILIES,
    corpus_text,
    generate_chat_records,
    make_sample,
    verify,
    write_jsonl,
)
from trainer.data.tokenizer import build_embedded_tokenizer, load_tokenizer
from trainer.data.packing import collate_packed, pack, pack_examples, pack_pairs, segment_sum
from trainer.data.preference import (
    HELPSTEER2_ATTRIBUTES,
    collate_pairs,
    collate_reward,
    pair_scalars,
    preference_messages,
    synthetic_preference_records,
    synthetic_reward_records,
    tokenize_pair,
    tokenize_reward_example,
    validate_preference_record,
    validate_reward_record,
)

__all__ = [
    "HELPSTEER2_ATTRIBUTES",
    "collate_packed",
    "collate_pairs",
    "collate_reward",
    "pack",
    "pack_examples",
    "pack_pairs",
    "pair_scalars",
    "preference_messages",
    "segment_sum",
    "synthetic_preference_records",
    "synthetic_reward_records",
    "tokenize_pair",
    "tokenize_reward_example",
    "validate_preference_record",
    "validate_reward_record",
    "TASK_FAMILIES",
    "DataError",
    "TemplateError",
    "build_embedded_tokenizer",
    "collate",
    "corpus_text",
    "generate_chat_records",
    "length_score",
    "produced_length",
    "required_length",
    "load_tokenizer",
    "make_sample",
    "read_jsonl",
    "tokenize_chat",
    "tokenize_prompt",
    "validate_chat_record",
    "validate_messages",
    "verify",
    "write_jsonl",
]
