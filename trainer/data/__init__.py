"""Data: JSONL formats, synthetic demo tasks, tokenizers, chat templating with loss masks, collation."""

from trainer.data.chat import TemplateError, collate, tokenize_chat
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

__all__ = [
    "TASK_FAMILIES",
    "DataError",
    "TemplateError",
    "build_embedded_tokenizer",
    "collate",
    "corpus_text",
    "generate_chat_records",
    "load_tokenizer",
    "make_sample",
    "read_jsonl",
    "tokenize_chat",
    "validate_chat_record",
    "validate_messages",
    "verify",
    "write_jsonl",
]
