"""Tests for preference / reward data (trainer.data.preference) and sequence packing (trainer.data.packing)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.data import DataError, build_embedded_tokenizer, collate, read_jsonl, tokenize_chat, verify
from trainer.data.packing import collate_packed, pack, pack_pairs, segment_sum
from trainer.data.preference import (
    HELPSTEER2_ATTRIBUTES,
    collate_pairs,
    collate_reward,
    preference_messages,
    synthetic_preference_records,
    synthetic_reward_records,
    tokenize_pair,
    tokenize_reward_example,
    validate_preference_record,
    validate_reward_record,
)
from trainer.losses import token_logps

FAMILIES = ["reverse", "sort", "upper", "copy", "swap_pairs", "count", "code_expr"]


@pytest.fixture(scope="module")
def tok(cache_dir: Path):
    return build_embedded_tokenizer(400, cache_dir)


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


GOOD = {"prompt": [_user("Reverse: abc")], "chosen": [_bot("cba")], "rejected": [_bot("bca")],
        "chosen_reward": 1.0, "rejected_reward": 0}


# --- validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"rejected": None}, "missing key 'rejected'"),
        ({"chosen": ""}, "chosen is an empty response"),
        ({"rejected": [_bot("  ")]}, "rejected[0].content is an empty response"),
        ({"chosen_reward": "high"}, "chosen_reward must be a number, got 'high'"),
        ({"rejected_reward": True}, "rejected_reward must be a number, got True"),
        ({"chosen_reward": math.nan}, "chosen_reward must be finite, got nan"),
        ({"rejected_reward": None}, "chosen_reward is given but rejected_reward is not"),
        ({"rejected": "cba"}, "chosen and rejected are identical"),
        ({"prompt": [_user("q"), _bot("a")]}, "prompt must end with a user turn, got 'assistant'"),
        ({"prompt": 3}, "prompt must be a string or a list of messages, got int"),
        ({"prompt": []}, "prompt must not be empty"),
        ({"chosen": [_user("Reverse: abc"), _bot("cba")]}, "chosen[0].role must be 'assistant', got 'user'"),
        ({"chosen": [{"role": "assistant"}]}, "chosen[0] has no 'content'"),
    ],
)
def test_validate_preference_record_reasons(change: dict, reason: str) -> None:
    record = {k: v for k, v in {**GOOD, **change}.items() if not (k == "rejected" and v is None)}
    with pytest.raises(ValueError) as info:
        validate_preference_record(record)
    assert reason in str(info.value)


def test_good_and_string_records_validate_and_normalise() -> None:
    validate_preference_record(GOOD)
    flat = {"prompt": "Reverse: abc", "chosen": "cba", "rejected": "bca"}
    validate_preference_record(flat)
    assert preference_messages(flat) == (GOOD["prompt"], GOOD["chosen"], GOOD["rejected"])


def test_read_jsonl_names_path_and_line(tmp_path: Path) -> None:
    bad = {**GOOD, "chosen_reward": "high"}
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_jsonl(path, validate_preference_record)
    assert str(info.value) == f"{path}:2: chosen_reward must be a number, got 'high'"
    assert read_jsonl(path, validate_preference_record, on_bad_record="skip") == ([GOOD], 1)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"messages": [_user("q"), _bot("a")]}, "missing key 'attributes'"),
        ({"messages": [_user("q")], "attributes": {"helpfulness": 1}}, "must end with an assistant turn"),
        ({"messages": [_user("q"), _bot("a")], "attributes": []}, "attributes must be an object, got list"),
        ({"messages": [_user("q"), _bot("a")], "attributes": {"helpfulnes": 1, "wit": 2}},
         "unknown attribute(s) 'helpfulnes', 'wit'"),
        ({"messages": [_user("q"), _bot("a")], "attributes": {"coherence": "4"}},
         "attributes.coherence must be a number, got '4'"),
        ({"messages": [_user("q"), _bot("a")], "attributes": {"verbosity": None}}, "has no score for any of"),
    ],
)
def test_validate_reward_record_reasons(record: dict, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_reward_record(record, HELPSTEER2_ATTRIBUTES)
    assert reason in str(info.value)


# --- tokenization ------------------------------------------------------------------------------------------


def _masked_text(tok, example: dict) -> str:
    return tok.decode([t for t, m in zip(example["input_ids"], example["assistant_mask"]) if m])


def test_tokenize_pair_masks_only_the_response(tok) -> None:
    record = {"prompt": [_user("Copy: ab"), _bot("ab"), _user("Reverse: abc")],
              "chosen": "cba", "rejected": "bca", "chosen_reward": 1, "rejected_reward": 0}
    pair = tokenize_pair(tok, record, max_length=128)
    assert _masked_text(tok, pair["chosen"]) == "cba<|end|>"  # the prompt's assistant turn is not masked
    assert _masked_text(tok, pair["rejected"]) == "bca<|end|>"
    assert (pair["chosen_reward"], pair["rejected_reward"]) == (1.0, 0.0)
    assert tokenize_pair(tok, {**record, "chosen_reward": None, "rejected_reward": None}, 128)["chosen_reward"] is None


def test_tokenize_pair_truncation(tok) -> None:
    record = {"prompt": "Copy: " + "abcd " * 20, "chosen": "xyz", "rejected": "zyx"}
    full = tokenize_pair(tok, record, max_length=1000)["chosen"]
    n, response = len(full["input_ids"]), sum(full["assistant_mask"])
    assert tokenize_pair(tok, record, n, "drop") is not None and tokenize_pair(tok, record, n - 1, "drop") is None
    # "left" keeps the whole response and cuts the prompt's head, down to one token before the response.
    left = tokenize_pair(tok, record, max_length=n - 10, truncation="left")["chosen"]
    assert left["input_ids"] == full["input_ids"][10:] and _masked_text(tok, left) == "xyz<|end|>"
    tight = n - full["assistant_mask"].index(1) + 1
    assert tokenize_pair(tok, record, tight, "left") is not None
    assert tokenize_pair(tok, record, tight - 1, "left") is None
    # "right" keeps the head: a partly cut response is kept, a fully cut one drops the pair.
    right = tokenize_pair(tok, record, max_length=n - 2, truncation="right")["chosen"]
    assert right["input_ids"] == full["input_ids"][: n - 2] and 0 < sum(right["assistant_mask"]) < response
    assert tokenize_pair(tok, record, max_length=n - response - 1, truncation="right") is None


def test_tokenize_reward_example_masks_missing_attribute_and_keeps_the_end(tok) -> None:
    record = {"messages": [_user("Upper: abc"), _bot("ABC")],
              "attributes": {"helpfulness": 3, "correctness": 4.0, "coherence": 4, "verbosity": 1}}
    validate_reward_record(record, HELPSTEER2_ATTRIBUTES)
    ex = tokenize_reward_example(tok, record, HELPSTEER2_ATTRIBUTES, max_length=64)
    assert ex["targets"] == [3.0, 4.0, 4.0, 0.0, 1.0]
    assert ex["target_mask"] == [1.0, 1.0, 1.0, 0.0, 1.0]
    full = tokenize_chat(tok, record["messages"], 64)
    assert ex["input_ids"] == full["input_ids"]
    # Truncation keeps the tail (the score is read at the last token) while the response fits.
    n, first = len(full["input_ids"]), full["assistant_mask"].index(1)
    short = tokenize_reward_example(tok, record, HELPSTEER2_ATTRIBUTES, max_length=n - 3)
    assert short["input_ids"] == full["input_ids"][3:]
    assert tokenize_reward_example(tok, record, HELPSTEER2_ATTRIBUTES, max_length=n - first) is None


# --- collation ---------------------------------------------------------------------------------------------


def _pairs(tok, n: int, seed: int = 0, max_length: int = 64) -> list[dict]:
    pairs = [tokenize_pair(tok, r, max_length) for r in synthetic_preference_records(n, seed, FAMILIES)]
    assert all(p is not None for p in pairs)
    return pairs


def test_collate_pairs_row_order_and_scalars(tok) -> None:
    pairs = _pairs(tok, 3)
    for i, p in enumerate(pairs):
        p["ref_chosen"], p["ref_rejected"] = -float(i), -10.0 - i
    batch = collate_pairs(pairs, tok.pad_token_id)
    plain = collate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], tok.pad_token_id)
    for key in ("input_ids", "labels", "loss_mask", "attention_mask"):
        assert torch.equal(batch[key], plain[key])
    assert batch["input_ids"].shape[0] == 6
    for i, p in enumerate(pairs):
        n = len(p["rejected"]["input_ids"]) - 1
        assert batch["input_ids"][3 + i, :n].tolist() == p["rejected"]["input_ids"][:-1]
    assert batch["chosen_reward"].tolist() == [1.0] * 3 and batch["rejected_reward"].tolist() == [0.0] * 3
    assert batch["ref_rejected"].tolist() == [-10.0, -11.0, -12.0]
    pairs[1]["rejected_reward"] = None
    assert "chosen_reward" not in collate_pairs(pairs, tok.pad_token_id)


def test_collate_reward_last_index(tok) -> None:
    records = synthetic_reward_records(4, 0, FAMILIES)
    examples = [tokenize_reward_example(tok, r, HELPSTEER2_ATTRIBUTES, 64) for r in records]
    batch = collate_reward(examples, tok.pad_token_id)
    for b, ex in enumerate(examples):
        last = int(batch["last_index"][b])
        assert last == len(ex["input_ids"]) - 1 and batch["input_ids"][b, last] == ex["input_ids"][-1]
        assert batch["attention_mask"][b].sum() == last + 1
    assert batch["targets"].shape == batch["target_mask"].shape == (4, len(HELPSTEER2_ATTRIBUTES))


# --- synthetic data ----------------------------------------------------------------------------------------


def test_synthetic_preference_pairs() -> None:
    records = synthetic_preference_records(100, seed=1, families=FAMILIES)
    assert records == synthetic_preference_records(100, seed=1, families=FAMILIES)
    assert records != synthetic_preference_records(100, seed=2, families=FAMILIES)
    assert {r["family"] for r in records} == set(FAMILIES)
    for r in records:
        validate_preference_record(r)
        prompt = r["prompt"][0]["content"]
        assert verify(r["family"], prompt, r["chosen"][0]["content"])
        assert not verify(r["family"], prompt, r["rejected"][0]["content"])
        assert (r["chosen_reward"], r["rejected_reward"]) == (1.0, 0.0)
    bare = synthetic_preference_records(5, seed=1, families=FAMILIES, with_rewards=False)
    assert all("chosen_reward" not in r for r in bare) and bare[0]["chosen"] == records[0]["chosen"]


def test_synthetic_reward_records() -> None:
    records = synthetic_reward_records(100, seed=0, families=FAMILIES)
    assert records == synthetic_reward_records(100, seed=0, families=FAMILIES)
    for r in records:
        validate_reward_record(r, HELPSTEER2_ATTRIBUTES)
        ok = verify(r["family"], r["messages"][0]["content"], r["messages"][1]["content"])
        if "correctness" in r["attributes"]:
            assert (r["attributes"]["correctness"] == 4.0) == ok
    assert any(len(r["attributes"]) < len(HELPSTEER2_ATTRIBUTES) for r in records)
    assert {r["attributes"].get("correctness") for r in records} >= {0.0, 1.0, 4.0}


# --- packing -----------------------------------------------------------------------------------------------


def test_pack_capacity_coverage_determinism() -> None:
    lengths = [7, 3, 9, 1, 5, 5, 2, 8, 4, 10, 6, 1]
    bins = pack(lengths, max_length=10)
    assert bins == pack(lengths, max_length=10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == math.ceil(sum(lengths) / 10)  # first-fit decreasing is optimal here
    with pytest.raises(ValueError, match="sequence 2 has length 11 > max_length=10"):
        pack([1, 2, 11], max_length=10)


def test_collate_packed_layout(tok) -> None:
    seqs = [p[side] for p in _pairs(tok, 3) for side in ("chosen", "rejected")]
    bins = [[0, 3], [1, 2, 4], [5]]
    batch = collate_packed(seqs, bins, tok.pad_token_id)
    assert "attention_mask" not in batch
    plain = collate(seqs, tok.pad_token_id)
    for r, b in enumerate(bins):
        at = 0
        for i in b:
            n = len(seqs[i]["input_ids"]) - 1
            for key in ("input_ids", "labels", "loss_mask"):  # exactly chat.collate's per-sequence shift
                assert torch.equal(batch[key][r, at:at + n], plain[key][i, :n])
            assert batch["position_ids"][r, at:at + n].tolist() == list(range(n))
            assert (batch["seq_id"][r, at:at + n] == i).all()
            at += n
        assert (batch["seq_id"][r, at:] == -1).all() and (batch["loss_mask"][r, at:] == 0).all()
    with pytest.raises(ValueError, match="exactly once"):
        collate_packed(seqs, [[0, 1], [1, 2, 3, 4, 5]], tok.pad_token_id)


def test_segment_sum_is_differentiable_and_ignores_padding() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0, float("nan")], [4.0, 5.0, 6.0, 7.0]], requires_grad=True)
    seq_id = torch.tensor([[0, 0, 2, -1], [1, 1, 1, 2]])
    out = segment_sum(values, seq_id, 3)
    assert out.tolist() == [3.0, 15.0, 10.0]
    (out * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert values.grad.tolist() == [[1.0, 1.0, 3.0, 0.0], [2.0, 2.0, 2.0, 3.0]]


def _model(attn: str, vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM._from_config(config, dtype=torch.float32, attn_implementation=attn).eval()


def _packed_logps(model, batch: dict, position_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], position_ids=position_ids, **kwargs).logits
    values = token_logps(logits, batch["labels"]) * batch["loss_mask"]
    return segment_sum(values, batch["seq_id"], int(batch["num_sequences"]))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_matches_padded_forward(tok, attn: str) -> None:
    """Attention stays within each packed sequence: per-sequence log-probs equal the padded forward's."""
    model = _model(attn, len(tok))
    pairs = _pairs(tok, 8, seed=3)
    with torch.no_grad():
        padded = collate_pairs(pairs, tok.pad_token_id)
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        expected = (token_logps(logits, padded["labels"]) * padded["loss_mask"]).sum(-1)

        packed = pack_pairs(pairs, max_length=64, pad_id=tok.pad_token_id)
        rows, length = packed["input_ids"].shape
        assert rows < 16 and int(packed["num_sequences"]) == 16
        assert (packed["seq_id"] >= 0).sum(-1).gt(padded["input_ids"].shape[1]).any()  # some row holds 2+
        got = _packed_logps(model, packed, packed["position_ids"], use_cache=False)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        assert torch.equal(packed["chosen_reward"], padded["chosen_reward"])

        # Negative controls, each must differ: positions that do not restart (one long sequence per row);
        # the Llama default use_cache=True, whose DynamicCache switches packed detection off; and any
        # attention_mask, even all ones, which does too.
        plain = torch.arange(length).expand(rows, length)
        assert (_packed_logps(model, packed, plain, use_cache=False) - expected).abs().max() > 1e-2
        restart = packed["position_ids"]
        assert (_packed_logps(model, packed, restart, use_cache=True) - expected).abs().max() > 1e-2
        ones = torch.ones_like(packed["input_ids"])
        masked = _packed_logps(model, packed, restart, use_cache=False, attention_mask=ones)
        assert (masked - expected).abs().max() > 1e-2
