"""Tests for trainer.data: records, synthetic tasks, the embedded tokenizer, chat masks, collate."""

from __future__ import annotations

import json
import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from trainer.data import (
    TASK_FAMILIES,
    DataError,
    TemplateError,
    build_embedded_tokenizer,
    collate,
    corpus_text,
    generate_chat_records,
    load_tokenizer,
    make_sample,
    read_jsonl,
    tokenize_chat,
    validate_chat_record,
    verify,
    write_jsonl,
)
from trainer.data import tokenizer as tokenizer_module
from trainer.data.chat import _assistant_char_spans, _mask_from_prefixes, _render

VOCAB = 400

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Reverse: abc"},
    {"role": "assistant", "content": "cba"},
    {"role": "user", "content": "Upper: ab c"},
    {"role": "assistant", "content": "AB C"},
]

CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tokenizer_cache")


@pytest.fixture(scope="module")
def tok(cache_dir: Path):
    return build_embedded_tokenizer(VOCAB, cache_dir)


def _chat(*turns: str) -> list[dict]:
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": c} for i, c in enumerate(turns)]


# --- records -------------------------------------------------------------------------------------------

GOOD = {"messages": _chat("hi", "hello")}


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_read_jsonl_error_names_file_and_line(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD), "", "{not json"])
    with pytest.raises(DataError) as info:
        read_jsonl(path, validate_chat_record)
    assert str(info.value).startswith(f"{path}:3: invalid JSON")


def test_read_jsonl_skip_counts_and_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad_role = {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}
    lines = [json.dumps(GOOD), "[1, 2]", json.dumps(bad_role), "", json.dumps({"messages": _chat("q", "a")})]
    path = _write_lines(tmp_path / "d.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="trainer.data.records"):
        records, skipped = read_jsonl(path, validate_chat_record, on_bad_record="skip")
    assert records == [GOOD, {"messages": _chat("q", "a")}]
    assert skipped == 2
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert f"{path}:2: expected a JSON object, got list" in warnings[0]
    assert f"{path}:3: messages[1].role must be one of system, user, assistant, got 'bot'" in warnings[1]


def test_read_jsonl_bad_policy_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="error, skip"):
        read_jsonl(tmp_path / "x.jsonl", validate_chat_record, on_bad_record="ignore")
    with pytest.raises(FileNotFoundError, match="x.jsonl"):
        read_jsonl(tmp_path / "x.jsonl", validate_chat_record)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({}, "missing key 'messages'"),
        ({"messages": []}, "messages must not be empty"),
        ({"messages": "hi"}, "messages must be a list"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content must be a string, got int"),
        ({"messages": [{"content": "x"}]}, "messages[0] has no 'role'"),
        ({"messages": _chat("q", "")}, "no assistant message with non-empty content"),
        ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message"),
    ],
)
def test_validate_chat_record_reasons(record: dict, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_chat_record(record)
    assert reason in str(info.value)


# --- synthetic ---------------------------------------------------------------------------------------


def test_generator_is_deterministic() -> None:
    families = list(TASK_FAMILIES)
    a = generate_chat_records(50, seed=3, families=families)
    assert a == generate_chat_records(50, seed=3, families=families)
    assert a != generate_chat_records(50, seed=4, families=families)
    assert {r["family"] for r in a} == set(families)
    # A fixed value guards against cross-version/machine drift (random.Random's algorithm is stable).
    assert generate_chat_records(1, seed=0, families=["reverse"])[0]["messages"][0]["content"] == "Reverse: biqpmz"


def test_samples_are_short_and_verified() -> None:
    rng = random.Random(0)
    for family in TASK_FAMILIES:
        for _ in range(30):
            prompt, answer = make_sample(family, rng)
            assert len(prompt) < 40 and len(answer) < 12
            assert verify(family, prompt, f"  {answer}\n")
            assert not verify(family, prompt, answer + "x")


def test_verify_examples() -> None:
    assert verify("reverse", "Reverse: abc", "cba")
    assert verify("sort", "Sort: cab", "abc")
    assert verify("count", "Count a in banana", "3") and not verify("count", "Count a in banana", "2")
    assert verify("swap_pairs", "Swap pairs: abcde", "badce")
    assert verify("code_expr", "Python expression: add 3 and 4", "3 + 4")
    assert verify("code_expr", "Python expression: add 3 and 4", "4+3")
    assert not verify("code_expr", "Python expression: add 3 and 4", "7")  # no operation performed
    assert not verify("code_expr", "Python expression: add 3 and 4", "3 * 4")
    assert not verify("code_expr", "Python expression: add 3 and 4", "__import__('os')")
    assert verify("code_expr", "Python expression: subtract 2 from 9", "9 - 2")
    assert not verify("code_expr", "Python expression: subtract 2 from 9", "2 - 9")


def test_unknown_family_lists_known() -> None:
    with pytest.raises(ValueError, match="reverse, sort"):
        make_sample("poetry", random.Random(0))
    with pytest.raises(ValueError, match="code_expr"):
        generate_chat_records(2, 0, ["poetry"])


def test_write_jsonl_roundtrip(tmp_path: Path) -> None:
    records = generate_chat_records(5, 0, ["copy", "count"])
    path = tmp_path / "out.jsonl"
    write_jsonl(path, records)
    assert not (tmp_path / "out.jsonl.tmp").exists()
    assert read_jsonl(path, validate_chat_record) == (records, 0)


# --- tokenizer ---------------------------------------------------------------------------------------


def test_tokenizer_round_trips_text(tok) -> None:
    texts = corpus_text(seed=1, n=100) + ["héllo wörld 日本 🙂", "  two  spaces\n\ttab ", "<0x41> literal"]
    for text in texts:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.unk_token_id not in tok.encode("".join(texts), add_special_tokens=False)


def test_tokenizer_matches_sentencepiece(tok, cache_dir: Path) -> None:
    (model_file,) = cache_dir.glob(f"*/{tokenizer_module.MODEL_FILE}")
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    for text in corpus_text(seed=2, n=100) + ["<|user|>\nSort: abc<|end|>\n", "日本 x  y"]:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text)


def test_tokenizer_specials_and_template(tok) -> None:
    assert len(tok) == VOCAB
    for marker in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert len(tok.encode(marker, add_special_tokens=False)) == 1
    assert tok.eos_token == "<|end|>" and tok.pad_token == "<pad>"
    text = tok.apply_chat_template(CONVERSATION[:3], tokenize=False, add_generation_prompt=False)
    assert text == "<|system|>\nBe brief.<|end|>\n<|user|>\nReverse: abc<|end|>\n<|assistant|>\ncba<|end|>\n"
    prompt = tok.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nReverse: abc<|end|>\n<|assistant|>\n"


def test_tokenizer_save_load_round_trip(tok, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path / "hf")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    for text in corpus_text(seed=5, n=20) + ["héllo 🙂 <|end|>", "a  b\n"]:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert loaded.chat_template == tok.chat_template
    assert loaded.apply_chat_template(CONVERSATION, tokenize=False) == tok.apply_chat_template(
        CONVERSATION, tokenize=False
    )
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.bos_token_id) == (
        tok.eos_token_id,
        tok.pad_token_id,
        tok.bos_token_id,
    )


def test_tokenizer_cache_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_train = tokenizer_module.train_sentencepiece

    def counting_train(*args, **kwargs):
        calls.append(args)
        real_train(*args, **kwargs)

    monkeypatch.setattr(tokenizer_module, "train_sentencepiece", counting_train)
    first = build_embedded_tokenizer(VOCAB, tmp_path)
    second = build_embedded_tokenizer(VOCAB, tmp_path)
    assert len(calls) == 1
    assert first.get_vocab() == second.get_vocab()
    build_embedded_tokenizer(VOCAB + 20, tmp_path)  # another key trains again
    assert len(calls) == 2
    assert len([p for p in tmp_path.iterdir()]) == 2  # two cache entries, no temp dirs left


def test_tokenizer_concurrent_builds_agree(tmp_path: Path) -> None:
    with ThreadPoolExecutor(4) as pool:
        toks = list(pool.map(lambda _: build_embedded_tokenizer(VOCAB, tmp_path), range(4)))
    assert all(t.get_vocab() == toks[0].get_vocab() for t in toks)
    assert len(list(tmp_path.iterdir())) == 1


def test_tokenizer_race_loser_uses_winner(tmp_path: Path) -> None:
    lines = corpus_text(0)
    final = tmp_path / "entry"
    tokenizer_module._train_into_cache(lines, VOCAB, final)
    stamp = (final / tokenizer_module.MODEL_FILE).stat().st_mtime_ns
    tokenizer_module._train_into_cache(lines, VOCAB, final)  # rename fails: the entry already exists
    assert (final / tokenizer_module.MODEL_FILE).stat().st_mtime_ns == stamp
    assert os.listdir(tmp_path) == ["entry"]


def test_tokenizer_vocab_too_small(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size=100"):
        build_embedded_tokenizer(100, tmp_path)


def test_load_tokenizer_pad_and_missing_template(tok, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path / "ok")
    loaded = load_tokenizer(str(tmp_path / "ok"))
    assert loaded.pad_token == "<pad>"

    config_path = tmp_path / "ok" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("pad_token")
    config_path.write_text(json.dumps(config))
    assert load_tokenizer(str(tmp_path / "ok")).pad_token == "<|end|>"

    (tmp_path / "ok" / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="no chat_template"):
        load_tokenizer(str(tmp_path / "ok"))


# --- chat: masks, truncation, collate -------------------------------------------------------------------


def _masked_text(tokenizer, out: dict) -> str:
    return tokenizer.decode([t for t, m in zip(out["input_ids"], out["assistant_mask"]) if m])


def test_mask_covers_assistant_content_and_end(tok) -> None:
    out = tokenize_chat(tok, CONVERSATION, max_length=200)
    assert len(out["input_ids"]) == len(out["assistant_mask"])
    assert _masked_text(tok, out) == "cba<|end|>AB C<|end|>"
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert out["input_ids"] == tok.encode(rendered, add_special_tokens=False)
    # The turn boundaries: the assistant header is unmasked, the content right after it is masked.
    ids, mask = out["input_ids"], out["assistant_mask"]
    header = ids.index(tok.convert_tokens_to_ids("<|assistant|>"))
    assert mask[header : header + 3] == [0, 0, 1]


def test_mask_slow_path_agrees_with_offsets(tok) -> None:
    text = _render(tok, CONVERSATION, add_generation_prompt=False)
    spans = _assistant_char_spans(tok, CONVERSATION, text)
    ids, mask = _mask_from_prefixes(tok, text, spans, add_special_tokens=False)
    out = tokenize_chat(tok, CONVERSATION, max_length=200)
    assert (ids, mask) == (out["input_ids"], out["assistant_mask"])


def test_mask_with_chatml_template(cache_dir: Path) -> None:
    chatml = build_embedded_tokenizer(VOCAB, cache_dir)  # a fresh object: the shared fixture stays intact
    chatml.add_special_tokens({"extra_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chatml.chat_template = CHATML
    out = tokenize_chat(chatml, CONVERSATION, max_length=200)
    assert _masked_text(chatml, out) == "cba<|im_end|>AB C<|im_end|>"
    # The template emits BOS itself, so the tokenizer must not add a second one.
    assert out["input_ids"].count(chatml.bos_token_id) == 1 and out["input_ids"][0] == chatml.bos_token_id


def test_mask_with_byte_level_tokenizer_and_llama3_like_template() -> None:
    """GPT-2-style byte-level BPE trims whitespace out of offsets (empty spans); masks must not lose them."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=True)
    specials = ["<|begin|>", "<|eot|>", "<|hdr|>", "<|ehdr|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(corpus_text(0, 300), trainer)
    byte_tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin|>", eos_token="<|eot|>")
    byte_tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|hdr|>{{ m['role'] }}<|ehdr|>\n\n{{ m['content'] }}<|eot|>"
        "{% endfor %}{% if add_generation_prompt %}<|hdr|>assistant<|ehdr|>\n\n{% endif %}"
    )
    messages = _chat("Reverse: abc", "line one\n\n  two  spaces", "x", "y z")
    out = tokenize_chat(byte_tok, messages, max_length=200)
    assert _masked_text(byte_tok, out) == "line one\n\n  two  spaces<|eot|>y z<|eot|>"
    assert out["input_ids"].count(byte_tok.bos_token_id) == 1


def test_template_not_prefix_stable_raises(cache_dir: Path) -> None:
    odd = build_embedded_tokenizer(VOCAB, cache_dir)
    odd.chat_template = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}\n{% endfor %}"
    with pytest.raises(TemplateError, match="not prefix-stable"):
        tokenize_chat(odd, CONVERSATION, max_length=200)


def test_truncation(tok) -> None:
    full = tokenize_chat(tok, CONVERSATION, max_length=200)
    n = len(full["input_ids"])
    right = tokenize_chat(tok, CONVERSATION, max_length=25, truncation="right")
    assert right["input_ids"] == full["input_ids"][:25] and sum(right["assistant_mask"]) == 2
    left = tokenize_chat(tok, CONVERSATION, max_length=25, truncation="left")
    assert left["input_ids"] == full["input_ids"][n - 25 :]
    assert left["assistant_mask"] == full["assistant_mask"][n - 25 :]
    assert tokenize_chat(tok, CONVERSATION, max_length=25, truncation="drop") is None
    assert tokenize_chat(tok, CONVERSATION, max_length=n, truncation="drop") == full
    # Cutting before the first assistant token leaves nothing to learn.
    assert tokenize_chat(tok, CONVERSATION, max_length=10, truncation="right") is None
    with pytest.raises(ValueError, match="right, left, drop"):
        tokenize_chat(tok, CONVERSATION, max_length=10, truncation="middle")


def test_collate_shapes_shift_and_padding(tok) -> None:
    a = tokenize_chat(tok, CONVERSATION, max_length=200)
    b = tokenize_chat(tok, _chat("Copy: xyz", "xyz"), max_length=200)
    batch = collate([a, b], pad_id=tok.pad_token_id)
    length = len(a["input_ids"])
    assert len(b["input_ids"]) < length
    dtypes = {"input_ids": torch.long, "labels": torch.long, "loss_mask": torch.float32, "attention_mask": torch.long}
    for key, dtype in dtypes.items():
        assert batch[key].shape == (2, length - 1) and batch[key].dtype == dtype
    nb = len(b["input_ids"])
    # input_ids[1, nb - 1] is b's last real token (it predicts a pad label, masked out by loss_mask).
    assert batch["attention_mask"][1].tolist() == [1] * nb + [0] * (length - 1 - nb)
    assert batch["labels"][1, nb - 1 :].tolist() == [tok.pad_token_id] * (length - nb)
    assert batch["loss_mask"][1, nb - 1 :].sum().item() == 0
    assert batch["loss_mask"][1].tolist() == [float(m) for m in b["assistant_mask"][1:]] + [0.0] * (length - nb)
    for row, ex in enumerate([a, b]):
        n = len(ex["input_ids"])
        assert batch["input_ids"][row, : n - 1].tolist() == ex["input_ids"][:-1]
        assert batch["labels"][row, : n - 2].tolist() == batch["input_ids"][row, 1 : n - 1].tolist()
    # The masked labels are exactly the assistant tokens: the model is trained to emit content + <|end|>.
    masked = batch["labels"][1][batch["loss_mask"][1].bool()].tolist()
    assert tok.decode(masked) == "xyz<|end|>"


def test_collate_pad_to(tok) -> None:
    ex = tokenize_chat(tok, _chat("Copy: ab", "ab"), max_length=200)
    batch = collate([ex], pad_id=0, pad_to=64)
    assert batch["input_ids"].shape == (1, 63)
    with pytest.raises(ValueError, match="pad_to=3"):
        collate([ex], pad_id=0, pad_to=3)
