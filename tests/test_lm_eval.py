"""``stagecraft eval``: lm-evaluation-harness on a local task, and the length-following score.

One tiny Llama (embedded tokenizer) is overfit in-test on the right answers of 4 of 8 multiple-choice
items and on 3 length-following prompts. lm-eval's accuracy must then equal the accuracy computed
here from the model's own log-likelihoods (transformers, no lm-eval code), and the length-following
score must equal LongWriter's S_l of the responses the model was trained to give.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from trainer.data import length_score
from trainer.data.tokenizer import build_embedded_tokenizer
from trainer.evaluation import length_following_score
from trainer.evaluation.tasks import synthetic_mc_items, write_task

N_ITEMS, N_TRAINED, LIMIT = 8, 4, 6
# prompt, required length as the record states it (None: read from the prompt), trained response.
LENGTH_RECORDS = [
    ({"prompt": "Write a 12 word poem about rain."}, "rain falls on the roof at night"),  # 12 asked, 7 written: S_l 64.29
    ({"prompt": "Describe a cat.", "required_length": 5}, "a cat sleeps in sun"),  # 5 asked, 5 written: S_l 100
    ({"prompt": "Say hello."}, "hello there"),  # no required length: skipped
]


def _chat_prompt(tokenizer, content: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def _overfit(model, tokenizer, pairs: list[tuple[str, str]], steps: int = 150) -> None:
    """Adam on the answer tokens of ``pairs`` (rendered prompt, answer + end of turn) until memorised."""
    examples = []
    for prompt, answer in pairs:
        p = tokenizer(prompt)["input_ids"]
        ids = tokenizer(prompt + answer + "<|end|>")["input_ids"]
        assert ids[:len(p)] == p
        labels = [-100] * len(p) + ids[len(p):]
        examples.append((torch.tensor([ids]), torch.tensor([labels])))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model gains nothing from threads, and loses 10x on a busy machine
    try:
        for _ in range(steps):
            optimizer.zero_grad()
            loss = sum(model(input_ids=ids, labels=labels).loss for ids, labels in examples) / len(examples)
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = build_embedded_tokenizer(400, cache_dir / "tokenizers")
    items = synthetic_mc_items(N_ITEMS, seed=3)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    pairs = [(_chat_prompt(tokenizer, it["question"]), it["choices"][it["answer"]]) for it in items[:N_TRAINED]]
    pairs += [(_chat_prompt(tokenizer, record["prompt"]), response) for record, response in LENGTH_RECORDS]
    _overfit(model, tokenizer, pairs)
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    return {"dir": root / "hf", "model": model, "tokenizer": tokenizer, "items": items, "root": root}


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """sum log p(continuation | context), continuation tokens = those after the context's own tokens."""
    ctx = tokenizer(context)["input_ids"]
    ids = tokenizer(context + continuation)["input_ids"]
    assert ids[:len(ctx)] == ctx and len(ids) > len(ctx)
    with torch.no_grad():
        logps = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return sum(logps[i - 1, ids[i]].item() for i in range(len(ctx), len(ids)))


def test_lm_eval_accuracy_equals_the_accuracy_from_the_models_own_likelihoods(trained):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional eval extra")
    model, tokenizer, items = trained["model"], trained["tokenizer"], trained["items"]
    right, right_norm = [], []
    for item in items[:LIMIT]:
        context = _chat_prompt(tokenizer, item["question"])
        lls = [_loglikelihood(model, tokenizer, context, choice) for choice in item["choices"]]
        right.append(max(range(len(lls)), key=lls.__getitem__) == item["answer"])
        per_char = [ll / len(c) for ll, c in zip(lls, item["choices"])]  # lm-eval's acc_norm: per character
        right_norm.append(max(range(len(lls)), key=per_char.__getitem__) == item["answer"])
    assert all(right[:N_TRAINED]), right  # the memorised items are answered; the others are the model's guess
    expected = sum(right) / LIMIT

    tasks = write_task(trained["root"] / "tasks", items, task="toy_mc").parent
    lf = trained["root"] / "length.jsonl"
    lf.write_text("".join(json.dumps(record) + "\n" for record, _ in LENGTH_RECORDS))
    out = trained["root"] / "eval"
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "eval", str(trained["dir"]), "--tasks", "toy_mc",
                           "--include-path", str(tasks), "--limit", str(LIMIT), "--apply-chat-template",
                           "--length-following", str(lf), "--max-new-tokens", "48", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "lm_eval.json").read_text())
    metrics = report["results"]["toy_mc"]
    assert metrics["acc,none"] == pytest.approx(expected)
    assert metrics["acc_norm,none"] == pytest.approx(sum(right_norm) / LIMIT)
    assert report["n-samples"]["toy_mc"] == {"original": N_ITEMS, "effective": LIMIT}
    assert f"toy_mc: acc {expected:.4f}" in proc.stdout

    length = json.loads((out / "length_following.json").read_text())
    assert length["score"] == pytest.approx((length_score(12, 7) + length_score(5, 5)) / 2)
    assert (length["n"], length["skipped"]) == (2, 1)
    assert "length following: mean S_l 82.1 over 2 prompts (1 without a required length skipped)" in proc.stdout


def test_length_following_score_scores_the_greedy_responses(trained):
    result = length_following_score(trained["dir"], [r for r, _ in LENGTH_RECORDS], max_new_tokens=48, device="cpu")
    assert [i["response"] for i in result["items"]] == [LENGTH_RECORDS[0][1], LENGTH_RECORDS[1][1]]
    assert [(i["required"], i["produced"]) for i in result["items"]] == [(12, 7), (5, 5)]
    assert [round(i["score"], 2) for i in result["items"]] == [64.29, 100.0]  # 100·(1 − (12/7 − 1)/2), exact
    assert result["score"] == pytest.approx((100 * (1 - (12 / 7 - 1) / 2) + 100) / 2) and result["skipped"] == 1


def test_unknown_task_and_missing_lm_eval_are_refused(trained, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional eval extra")
    from trainer.evaluation.lm_eval import run_lm_eval
    from trainer.runtime.errors import BadInput

    with pytest.raises(BadInput, match=r"--tasks: no_such_task not found in lm-eval's tasks or in --include-path"):
        run_lm_eval(trained["dir"], ["no_such_task"], include_path=[trained["root"]])
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(BadInput, match=r"pip install 'stagecraft\[eval\]'"):
        run_lm_eval(trained["dir"], ["toy_mc"])


def test_synthetic_mc_items_have_one_right_answer_among_distinct_choices():
    from trainer.data import verify

    items = synthetic_mc_items(70, seed=0)
    assert items == synthetic_mc_items(70, seed=0)  # deterministic
    for item in items:
        assert len(set(item["choices"])) == 4
        assert [verify(item["family"], item["question"], c) for c in item["choices"]].count(True) == 1
        assert verify(item["family"], item["question"], item["choices"][item["answer"]])
    assert sorted({i["answer"] for i in items}) == [0, 1, 2, 3]  # the right answer is not always first


def test_the_recipe_eval_length_score_is_the_mean_s_l_of_the_same_generations(trained, monkeypatch):
    """recipe.eval.length_following's metric (prompts sharded over data-parallel ranks; here one rank,
    so the sum over ranks is the identity): the mean S_l and produced/required of the two records that
    ask for a length, as computed by hand above."""
    from types import SimpleNamespace

    from trainer.recipe import evaluate

    monkeypatch.setattr(evaluate, "all_reduce_sum", lambda value, group: value)
    topology = SimpleNamespace(dp_rank=0, dp=1, dp_group=None)
    found = evaluate.length_following(trained["model"].eval(), trained["tokenizer"], [r for r, _ in LENGTH_RECORDS],
                                      48, topology)
    assert found["length_scored"] == 2
    assert found["length_score"] == pytest.approx((100 * (1 - (12 / 7 - 1) / 2) + 100) / 2)
    assert found["length_ratio"] == pytest.approx((7 / 12 + 5 / 5) / 2)
