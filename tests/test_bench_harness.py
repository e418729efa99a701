"""benchmarks/compare_trl.py's deterministic inputs and token accounting (no TRL, no timing)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location("compare_trl", Path(__file__).parents[1] / "benchmarks/compare_trl.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_assets_have_the_stated_sizes(tmp_path):
    sizes = bench.build_assets(tmp_path)
    # Embedding and LM head 4096 x 256 each; per layer q,k,v,o 256 x 256, gate/up/down 256 x 1024, two
    # norms of 256; the final norm.
    layer = 4 * 256 * 256 + 3 * 256 * 1024 + 2 * 256
    assert {k: sizes[k] for k in ("vocab", "parameters", "chat_records", "chat_tokens", "pairs", "long_prompt_pairs")} == {
        "vocab": 4096, "parameters": 2 * 4096 * 256 + 4 * layer + 256, "chat_records": 512, "chat_tokens": [44, 427],
        "pairs": 256, "long_prompt_pairs": 256}
    lo, hi = sizes["pair_tokens"]
    assert 2 * 44 <= lo < hi <= 2 * bench.MAX_LENGTH["dpo"]
    assert len((tmp_path / "sft.jsonl").read_text().splitlines()) == 512
    pair = json.loads((tmp_path / "dpo.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in pair["prompt"] + pair["chosen"] + pair["rejected"]] == ["user", "assistant", "assistant"]
    # Long-prompt pairs: every side fits max_length, the prompt ends with the user's turn after whole
    # exchanges, and prompts are most of the tokens (the case prompt sharing is for); short ones are not.
    from trainer.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tmp_path / "model"))
    for line in (tmp_path / "dpo_long_prompt.jsonl").read_text().splitlines():
        pair = json.loads(line)
        prompt, chosen, rejected = bench.token_layout(tokenizer, pair)
        assert prompt + max(chosen, rejected) <= bench.MAX_LENGTH["dpo_long_prompt"]
        assert [m["role"] for m in pair["prompt"]] in (["user"], ["user", "assistant", "user"],
                                                      ["user", "assistant"] * 2 + ["user"])
    assert sizes["long_prompt_prompt_share"] > 0.5 > 0.1 > sizes["prompt_share"]
    # Deterministic: a second build writes the same files.
    again = tmp_path / "again"
    bench.build_assets(again)
    for name in ("sft.jsonl", "dpo.jsonl", "dpo_long_prompt.jsonl", "model/model.safetensors", "model/tokenizer.json"):
        assert (again / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_real_tokens_by_hand():
    # SFT padded: rows of 3 and 1 real tokens.
    assert bench.real_tokens({"input_ids": torch.zeros(2, 3), "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 0]])}) == 4
    # SFT padding-free: one row of 5, no padding.
    assert bench.real_tokens({"input_ids": torch.zeros(1, 5), "position_ids": torch.tensor([[0, 1, 2, 0, 1]])}) == 5
    # DPO, TRL's collator example: pairs (prompt 3, chosen 2, rejected 1) and (prompt 2, chosen 1, rejected 2)
    # count 3 + 2 + 1 + 2 + 1 + 2 = 11, the prompts once.
    dpo = {"input_ids": torch.zeros(4, 5, dtype=torch.long),
           "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]),
           "completion_mask": torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 0]])}
    assert bench.real_tokens(dpo) == 11


def test_causal_context_by_hand():
    # A sequence of 3 attends 1 + 2 + 3 keys; a pair (prompt 2, responses 1 and 2) attends 1 + 2, then 3,
    # then 3 + 4: 13 keys over 5 tokens.
    assert bench.causal_context([[3]]) == 2
    assert bench.causal_context([[2, 1, 2]]) == 13 / 5
    assert bench.causal_context([[3], [2, 1, 2]]) == (6 + 13) / 8
