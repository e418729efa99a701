"""Curation tools (trainer/curation, docs/curation.md): the length rules on real phrasings, each tool end
to end through `stagecraft data <tool>`, and every kept set checked against an independent computation
(the generator's ground truth, the reward model's own unbatched scores, brute-force Jaccard, the
families the DSIR pool was drawn from)."""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.curation import run_tool
from trainer.curation.cli import main as cli_main
from trainer.curation.longwriter_data import chinese_number, generate
from trainer.curation.select import gumbel_top_k
from trainer.data import produced_length, required_length
from trainer.data.length import chinese_numeral
from trainer.runtime.errors import BadInput

# --- required_length on real-world phrasings ---------------------------------------------------------------

PHRASINGS = [
    # English: plain, separators, hyphenated, brackets, bounds, multipliers
    ("Write a 2,000-word essay on climate change.", 2000),
    ("Write an essay about dogs (1500 words).", 1500),
    ("Write a story of at least 1000 words.", 1000),
    ("Approximately 1,200 words, please.", 1200),
    ("Write a 1000 word essay on the French Revolution", 1000),
    ("Write 2000+ words on the topic", 2000),
    ("Keep it under 300 words.", 300),
    ("No more than 150 words.", 150),
    ("Write 5k words about the Roman Empire", 5000),
    ("Write a 10,000-word novella", 10000),
    ("word count: 800", 800),
    ("Word limit: 1,500. Write about tea.", 1500),
    ("Write about 2000 Chinese characters on the Tang dynasty", 2000),
    # English ranges: midpoint, half up
    ("Write 3000-5000 words about AI", 4000),
    ("Write 3,000–5,000 words about AI", 4000),
    ("Write between 300 and 500 words on X", 400),
    ("Write 300 to 500 words on X", 400),
    ("write a 3-5k word story", 4000),
    ("Compose a 1200-1500 word report", 1350),
    ("Write 301-400 words", 351),
    # English: several lengths, totals, per-part, quoted texts
    ("Summarize this 5000-word article in 200 words.", 200),
    ("Write a 2000-word essay; the introduction should be about 200 words.", 2000),
    ("Write 5 sections of 300 words each, 1500 words in total.", 1500),
    ("Write 5 paragraphs of 100 words each", None),
    # English: numbers that are not lengths
    ("In 2024, 5 people went to the park. Write about it.", None),
    ("He types 60 words per minute. Write about him.", None),
    ("List 10 words that rhyme with cat.", None),
    ("Name 20 words starting with b", None),
    ("Write 1000 tokens", None),
    ("Write 3 pages about your summer", None),
    ("Write 2000 characters", None),
    ("Describe it in 3 words", None),
    ("A picture is worth a thousand words", None),
    ("Explain gravity to a 10-year-old.", None),
    # Chinese: Arabic numerals, qualifiers, separators
    ("字数要求：不少于5000字", 5000),
    ("写一篇800字左右的作文", 800),
    ("写一篇不少于10,000字的论文", 10000),
    ("请写一篇5000余字的报告", 5000),
    ("写一篇500词的英语作文", 500),
    ("写一篇关于春天的文章，字数在3000左右", 3000),
    ("写一篇1500个汉字的短文", 1500),
    ("应该3000字左右", 3000),
    ("每天写作练习：写一篇800字的文章", 800),
    ("千万不要超过500字", 500),
    # Chinese numerals and 万
    ("写一篇一万字的小说", 10000),
    ("写一篇1万字的小说", 10000),
    ("写一篇1.5万字的小说", 15000),
    ("写一篇两千五百字的散文", 2500),
    ("写三千多字的游记", 3000),
    ("写一篇二十万字的小说", 200000),
    ("写一篇万字长文", 10000),
    # Chinese ranges
    ("写一篇3000到5000字的文章", 4000),
    ("写一篇3000至5000字的文章", 4000),
    ("写3000~5000字", 4000),
    ("1-2万字的报告", 15000),
    ("五千至一万字", 7500),
    ("三到五千字", 4000),
    ("5000-1万字", 7500),
    ("字数：3000-5000", 4000),
    # Chinese: totals, per-part, not lengths
    ("共5章，每章1000字，总字数5000字", 5000),
    ("每章1000字", None),
    ("打字速度每分钟60字", None),
    ("十字路口的故事，写一篇文章", None),
    ("用四字成语概括", None),
    ("万一字数不够怎么办", None),
    ("一字不差地翻译", None),
    ("写几千字就行", None),
    ("写一篇上万字的长文", None),
    ("写五〇〇〇字", None),
    ("Write a five hundred words essay", None),
    ("字数不限，写2024年的事", None),
    ("请列出5个关于茶的要点", None),
    ("2023年有300人参加了比赛，请写一篇报道", None),
]


@pytest.mark.parametrize("instruction, expected", PHRASINGS)
def test_required_length_phrasings(instruction, expected):
    assert required_length(instruction) == expected


def test_chinese_numerals_parse_and_round_trip():
    table = {"三千五百": 3500, "两千五": 2500, "一万五": 15000, "十五": 15, "二十万": 200000, "一万五千": 15000,
             "三千零五": 3005, "一百五": 150, "一千零一": 1001, "十": 10, "千": 1000, "一万零五百": 10500}
    assert {s: chinese_numeral(s) for s in table} == table
    for malformed in ("万一", "三五", "百三", "千万", "五〇〇〇"):
        assert chinese_numeral(malformed) is None, malformed
    # Every writing of 1..99999 by the generator reads back as its value.
    assert all(chinese_numeral(chinese_number(n)) == n for n in range(1, 100000, 7))


@pytest.mark.parametrize("text, expected", [
    ("Hello world", 2),
    ("don't stop", 3),                      # \b splits at the apostrophe: don, t, stop
    ("我爱北京天安门。", 7),                 # ideographs only; 。 counts 0
    ("In 2024 we wrote 3 essays.", 4),     # digits count 0
    ("我用Python写代码", 5),                 # a Latin word glued to CJK has no \b: not counted
    ("我用 Python 写代码", 6),               # spaced, it counts once
    ("café au lait", 2),                   # é is a word character: "café" is no match
    ("", 0),
    ("ＡＢＣ full-width", 2),                 # full-width letters are not [a-zA-Z]
])
def test_produced_length_is_longwriters_count(text, expected):
    assert produced_length(text) == expected


# --- the LongWriter generator and the length filter ------------------------------------------------------


def test_longwriter_generator_ground_truth_is_exact_and_seeded():
    records, truths = generate(150, seed=3, max_required=20000)
    assert {t.language for t in truths} == {"en", "zh"}
    assert 0 < sum(t.required is None for t in truths) < 150
    assert any("万字" in r["messages"][0]["content"] for r in records)  # the 万 phrasing appears
    for record, truth in zip(records, truths):
        user, assistant = record["messages"]
        assert required_length(user["content"]) == truth.required, user["content"]
        assert produced_length(assistant["content"]) == truth.produced
    assert generate(150, seed=3, max_required=20000)[0] == records
    assert generate(150, seed=4, max_required=20000)[0] != records


def _keeps_at_80(required: int, produced: int) -> bool:
    """S_l >= 80 in integers: 1/1.4 <= produced/required <= 1.6, i.e. 7p >= 5r and 5p <= 8r."""
    return 7 * produced >= 5 * required and 5 * produced <= 8 * required


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records),
                    encoding="utf-8")
    return path


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def stagecraft_data(*args: str) -> subprocess.CompletedProcess:
    """`stagecraft data ...` as a user types it (the same entry point as the installed script)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "trainer.cli", "data", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


def test_length_filter_cli_keeps_what_the_ground_truth_says(tmp_path):
    records, truths = generate(240, seed=11)
    data = _write_jsonl(tmp_path / "lw.jsonl", records)
    proc = stagecraft_data("length-filter", data, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    expected = [r for r, t in zip(records, truths) if t.required is not None and _keeps_at_80(t.required, t.produced)]
    no_requirement = sum(t.required is None for t in truths)
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["steps"] == {"records": 240, "no_requirement": no_requirement,
                               "with_requirement": 240 - no_requirement,
                               "below_threshold": 240 - no_requirement - len(expected), "kept": len(expected)}
    assert _jsonl(tmp_path / "out/kept.jsonl") == expected
    assert 0 < len(expected) < 240 - no_requirement  # both steps drop something
    # Before/after: the filter raised the mean score and every kept ratio is inside the bounds.
    assert report["after"]["mean_score"] > report["before"]["mean_score"]
    assert report["kept_ratio_range"] == pytest.approx([1 / 1.4, 1.6])
    first_drop = report["examples"]["below_threshold"][0]
    assert re.fullmatch(rf"{re.escape(str(data))}:\d+", first_drop["where"])
    assert first_drop["score"] < 80
    assert (tmp_path / "out/length_scatter.png").stat().st_size > 10_000
    assert "S_l >= 80" in (tmp_path / "out/report.md").read_text()
    assert proc.stdout.startswith(f"length-filter: 240 records, {no_requirement} without a length requirement")


def test_length_filter_keeps_exact_boundaries_and_threshold_option(tmp_path):
    def chat(required, produced):
        return {"messages": [{"role": "user", "content": f"Write {required} words."},
                             {"role": "assistant", "content": " ".join(["word"] * produced)}]}

    # required 1000: 1600 (x1.6) and 715 (>= 1/1.4) sit on/inside the S_l = 80 bounds, 1601 and 714 outside.
    cases = [(1000, 1600), (1000, 1601), (1000, 715), (1000, 714), (1000, 1000), (1400, 1000)]
    data = _write_jsonl(tmp_path / "b.jsonl", [chat(*c) for c in cases])
    report = run_tool("length-filter", [data], tmp_path / "out", {"plot": False})
    assert report["kept"] == 4
    kept = [(required_length(r["messages"][0]["content"]), len(r["messages"][1]["content"].split()))
            for r in _jsonl(tmp_path / "out/kept.jsonl")]
    assert kept == [(1000, 1600), (1000, 715), (1000, 1000), (1400, 1000)]
    assert run_tool("length-filter", [data], tmp_path / "t95", {"threshold": 95, "plot": False})["kept"] == 1
    with pytest.raises(BadInput, match=r"--threshold \(options\.threshold\) must be in \[0, 100\]"):
        run_tool("length-filter", [data], tmp_path / "bad", {"threshold": 120})
    with pytest.raises(BadInput, match=r"unknown option\(s\) treshold"):
        run_tool("length-filter", [data], tmp_path / "bad", {"treshold": 50})


# --- bad records --------------------------------------------------------------------------------------------


def test_bad_record_exits_2_naming_file_and_line(tmp_path):
    good = {"messages": [{"role": "user", "content": "Write 100 words."}, {"role": "assistant", "content": "ok"}]}
    data = _write_jsonl(tmp_path / "d.jsonl", [good, good, "{not json"])
    proc = stagecraft_data("length-filter", data, "-o", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"stagecraft: error: {data}:3: invalid JSON")
    assert not (tmp_path / "out/report.json").exists()


def test_wrong_kind_and_bad_options_are_errors_in_process(tmp_path, capsys):
    pair = {"prompt": "p", "chosen": "a", "rejected": "b"}
    data = _write_jsonl(tmp_path / "p.jsonl", [pair])
    code = cli_main(["reward-filter", str(data), "-o", str(tmp_path / "o"), "--reward-model", "x", "--threshold", "0"])
    assert code == 2
    assert f"stagecraft: error: {data}:1: a preference record; reward-filter reads chat, row records" in \
        capsys.readouterr().err
    odd = _write_jsonl(tmp_path / "odd.jsonl", [{"messages": [{"role": "user", "content": "a"}, {
        "role": "assistant", "content": "b"}]}, {"text": "no known keys"}])
    assert cli_main(["stats", str(odd), "-o", str(tmp_path / "o")]) == 2
    assert f"{odd}:2: not a chat, prompt/response row, preference or candidates record" in capsys.readouterr().err
    code = cli_main(["dedup", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o")])
    assert code == 2 and "missing.jsonl: input file not found" in capsys.readouterr().err
    assert cli_main(["select", str(data), "-o", str(tmp_path / "o"), "--target", str(data)]) == 2
    assert "--k (options.k) or --fraction (options.fraction): give exactly one" in capsys.readouterr().err
    assert cli_main(["dedup", "--help"]) == 0
    assert "--threshold THRESHOLD" in capsys.readouterr().out


# --- stats --------------------------------------------------------------------------------------------------

STATS_RECORDS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"},
                  {"role": "assistant", "content": "Hello there friend"}]},
    {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好，朋友"}]},
    {"prompt": "Pick one", "chosen": "The first", "rejected": "The second one"},
    "{\"messages\": 3}",
    {"prompt": "用 Python 写", "response": "好的 print hello 完成"},
]


def test_stats_cli_counts_lengths_roles_languages_and_bad_records(tmp_path):
    data = _write_jsonl(tmp_path / "s.jsonl", STATS_RECORDS)
    proc = stagecraft_data("stats", data, "-o", tmp_path / "out", "--on-bad-record", "skip", "--bins", "4")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert (report["records"], report["bad_records"], report["bad_by_file"]) == (4, 1, {str(data): 1})
    assert report["output"] is None and not (tmp_path / "out/kept.jsonl").exists()
    assert report["kinds"] == {"chat": 2, "preference": 1, "row": 1}
    assert report["turns"] == {"2": 3, "3": 1}
    assert report["roles"] == {"assistant": 5, "system": 1, "user": 4}
    # LongWriter words per conversation, by hand:
    #   chat 1: "Be brief." 2 + "Say hello" 2 + 3 = 7; chat 2: 2 + 4 = 6; pair: 2+2 = 4 and 2+3 = 5;
    #   row: "用 Python 写" 3 + "好的 print hello 完成" 6 = 9
    lengths = sorted([7, 6, 4, 5, 9])
    q = report["conversation_length"]
    assert (q["min"], q["p50"], q["max"], q["mean"]) == (4, 6, 9, pytest.approx(sum(lengths) / 5))
    assert sum(q["histogram"]["counts"]) == 5 and len(q["histogram"]["counts"]) == 4
    assert report["response_length"]["max"] == 6
    # latin: chat 1 and the pair; cjk: chat 2; the row has 6 ideographs and 16 letters: share 0.27, mixed.
    assert report["language"] == {"cjk": 1, "latin": 2, "mixed": 1}
    assert (tmp_path / "out/lengths.png").is_file()


def test_stats_counts_tokens_with_a_tokenizer(tmp_path, tokenizer_dir):
    from trainer.data.chat import tokenize_chat
    from trainer.data.tokenizer import load_tokenizer

    data = _write_jsonl(tmp_path / "s.jsonl", [r for r in STATS_RECORDS if not isinstance(r, str)])
    report = run_tool("stats", [data], tmp_path / "out", {"tokenizer": str(tokenizer_dir), "plot": False})
    tok = load_tokenizer(str(tokenizer_dir))

    def turns(user, assistant):
        return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]

    conversations = [STATS_RECORDS[0]["messages"], STATS_RECORDS[1]["messages"], turns("Pick one", "The first"),
                     turns("Pick one", "The second one"), turns("用 Python 写", "好的 print hello 完成")]
    lengths = sorted(len(tokenize_chat(tok, c, 10**6)["input_ids"]) for c in conversations)
    q = report["conversation_length"]
    assert report["unit"] == "tokens"
    assert (q["min"], q["p50"], q["max"], q["mean"]) == (lengths[0], lengths[2], lengths[-1],
                                                         pytest.approx(sum(lengths) / 5))
    assert report["response_length"]["min"] == len(tok("The first", add_special_tokens=False)["input_ids"])


# --- reward filter ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from trainer.data import build_embedded_tokenizer

    path = tmp_path_factory.mktemp("tok")
    build_embedded_tokenizer(400, tmp_path_factory.mktemp("tokcache")).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random reward model saved as the reward stage exports one, with non-trivial weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.data.tokenizer import load_tokenizer
    from trainer.losses.reward import HELPSTEER2_ATTRIBUTES
    from trainer.models.reward import RewardModel

    tok = load_tokenizer(str(tokenizer_dir))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    model = RewardModel(LlamaForCausalLM(config), HELPSTEER2_ATTRIBUTES, [1.0, 0.5, 0.0, 0.0, -0.25])
    with torch.no_grad():
        model.head.weight.normal_(0.0, 1.0)  # rewards of order 1, so responses are far apart
    path = tmp_path_factory.mktemp("rm")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def own_reward(reward_dir: Path, conversation: list[dict]) -> float:
    """The saved model's reward of one conversation, unbatched (no padding), read at its last token."""
    from trainer.data.chat import tokenize_chat
    from trainer.data.tokenizer import load_tokenizer
    from trainer.models.reward import load_reward_model

    key = str(reward_dir)
    if key not in _MODELS:
        _MODELS[key] = (load_reward_model(reward_dir).eval(), load_tokenizer(key))
    model, tok = _MODELS[key]
    ids = torch.tensor([tokenize_chat(tok, conversation, 10**6)["input_ids"]])
    with torch.no_grad():
        return model.reward(model(ids, torch.ones_like(ids), torch.tensor([ids.shape[1] - 1]))).item()


_MODELS: dict = {}
_PROMPTS = ["Describe the sea", "Name a color", "What is two plus two", "Say something kind"]
_ANSWERS = ["The sea is wide and blue", "Red", "Four", "You did well today", "abc abc abc", "I do not know",
            "Blue like the sky", "It is 4", "zzz"]


def _chats(n_per_prompt: int) -> list[dict]:
    rng = random.Random(5)
    return [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": rng.choice(_ANSWERS)}],
             "id": f"{i}-{j}"} for i, p in enumerate(_PROMPTS) for j in range(n_per_prompt)]


def test_reward_filter_cli_threshold_keeps_the_models_own_high_scores(tmp_path, reward_dir):
    records = _chats(3)
    own = [own_reward(reward_dir, r["messages"]) for r in records]
    ordered = sorted(own)
    gap, i = max((ordered[k + 1] - ordered[k], k) for k in range(len(ordered) // 3, 2 * len(ordered) // 3))
    assert gap > 1e-3  # the threshold sits well clear of every score: batching noise cannot flip one
    threshold = (ordered[i] + ordered[i + 1]) / 2
    data = _write_jsonl(tmp_path / "c.jsonl", records)
    proc = stagecraft_data("reward-filter", data, "-o", tmp_path / "out", "--reward-model", reward_dir,
                           "--threshold", repr(threshold), "--batch-size", "5")
    assert proc.returncode == 0, proc.stderr
    kept = _jsonl(tmp_path / "out/kept.jsonl")
    assert [r["id"] for r in kept] == [r["id"] for r, s in zip(records, own) if s >= threshold]
    for r in kept:
        assert r["reward"] == pytest.approx(own[[x["id"] for x in records].index(r["id"])], abs=1e-5)
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["dropped"] == {"low_reward": len(records) - len(kept)}
    assert report["attribute_weights"] == [1.0, 0.5, 0.0, 0.0, -0.25]
    assert report["rewards"]["max"] == pytest.approx(ordered[-1], abs=1e-5)
    assert (tmp_path / "out/rewards.png").is_file()


def test_reward_filter_top_fraction_per_prompt(tmp_path, reward_dir):
    records = _chats(4)
    own = [own_reward(reward_dir, r["messages"]) for r in records]
    data = _write_jsonl(tmp_path / "c.jsonl", records)
    report = run_tool("reward-filter", [data], tmp_path / "out",
                      {"reward_model": str(reward_dir), "top_fraction": 0.4, "plot": False})
    expected = set()
    for p in _PROMPTS:  # ceil(0.4 * 4) = 2 best of each prompt's 4 (ties: the earlier one)
        group = [(s, -k) for k, (r, s) in enumerate(zip(records, own)) if r["messages"][0]["content"] == p]
        expected |= {records[-k]["id"] for _, k in sorted(group, reverse=True)[:2]}
    assert {r["id"] for r in _jsonl(tmp_path / "out/kept.jsonl")} == expected
    assert report["kept"] == 8


def test_reward_model_as_judge_reorders_pairs_and_picks_from_candidates(tmp_path, reward_dir):
    pairs = [{"prompt": p, "chosen": a, "rejected": b, "source": "x"}
             for p in _PROMPTS for a, b in [(_ANSWERS[0], _ANSWERS[4]), (_ANSWERS[4], _ANSWERS[0])]]
    candidates = [{"prompt": [{"role": "user", "content": p}], "responses": _ANSWERS[:5]} for p in _PROMPTS]
    data = _write_jsonl(tmp_path / "j.jsonl", pairs + candidates)
    report = run_tool("reward-filter", [data], tmp_path / "out",
                      {"reward_model": str(reward_dir), "mode": "judge", "plot": False})
    out = _jsonl(tmp_path / "out/kept.jsonl")
    assert len(out) == len(pairs) + len(candidates)

    def reward(prompt, response):
        user = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return own_reward(reward_dir, user + [{"role": "assistant", "content": response}])

    flips = 0
    for before, after in zip(pairs, out):
        rc, rr = reward(before["prompt"], before["chosen"]), reward(before["prompt"], before["rejected"])
        flips += rr > rc
        assert {after["chosen"], after["rejected"]} == {before["chosen"], before["rejected"]}
        assert after["chosen_reward"] == pytest.approx(max(rc, rr), abs=1e-5) and after["source"] == "x"
    assert report["reordered"] == flips == len(_PROMPTS)  # each pair is there in both orders: one flips
    for before, after in zip(candidates, out[len(pairs):]):
        scores = [reward(before["prompt"], r) for r in before["responses"]]
        assert after["chosen"] == before["responses"][scores.index(max(scores))]
        assert after["rejected"] == before["responses"][scores.index(min(scores))]
        assert "responses" not in after and after["prompt"] == before["prompt"]


# --- dedup --------------------------------------------------------------------------------------------------


def _shingle_jaccard(a: str, b: str, n: int = 3) -> float:
    """Jaccard of word 3-gram sets, written out independently of trainer/curation."""
    def grams(text):
        words = re.findall(r"[a-z0-9]+", text.lower())
        return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}

    x, y = grams(a), grams(b)
    return len(x & y) / len(x | y)


def test_dedup_cli_removes_exact_and_near_duplicates_only(tmp_path):
    rng = random.Random(1)
    vocab = ["".join(rng.choice("abcdefghij") for _ in range(5)) for _ in range(400)]
    bases = [" ".join(rng.choice(vocab) for _ in range(60)) for _ in range(40)]
    texts, expect_drop = list(bases), set()
    for i in range(0, 10):  # exact copies, changed only in case and spacing
        texts.append("  " + bases[i].upper().replace(" ", "   "))
        expect_drop.add(len(texts) - 1)
    for i in range(10, 20):  # one word replaced: J = 55/61 ≈ 0.90
        words = bases[i].split()
        words[30] = "zzzzz"
        texts.append(" ".join(words))
        expect_drop.add(len(texts) - 1)
    for i in range(20, 30):  # ten words replaced, spread out: J well below 0.8, kept
        words = bases[i].split()
        for k in range(2, 60, 6):
            words[k] = "yyyyy"
        texts.append(" ".join(words))
    order = list(range(len(texts)))
    records = [{"messages": [{"role": "user", "content": texts[k]}, {"role": "assistant", "content": f"r{k}"}],
                "k": k} for k in order]
    for k in range(40, 60):
        assert _shingle_jaccard(texts[k], bases[k - 40]) > 0.85
    for k in range(60, 70):
        assert _shingle_jaccard(texts[k], bases[k - 40]) < 0.6
    data = _write_jsonl(tmp_path / "d.jsonl", records)
    proc = stagecraft_data("dedup", data, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    kept = [r["k"] for r in _jsonl(tmp_path / "out/kept.jsonl")]
    assert kept == [k for k in order if k not in expect_drop]
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert (report["exact_duplicates"], report["near_duplicates"], report["kept"]) == (10, 10, 50)
    assert (report["lsh"]["bands"], report["lsh"]["rows"]) == (14, 9)
    near = report["examples"]["near"][0]
    assert near["where"] == f"{data}:51" and near["duplicate_of"] == f"{data}:11"
    assert near["jaccard"] == pytest.approx(_shingle_jaccard(texts[50], bases[10]), abs=1e-4)
    # Brute force over every kept pair: nothing at or above the threshold survived.
    survivors = [texts[k] for k in kept]
    assert max(_shingle_jaccard(a, b) for i, a in enumerate(survivors) for b in survivors[i + 1:]) < 0.8
    # The whole conversation as key: the different responses make the exact copies merely near.
    conv = run_tool("dedup", [data], tmp_path / "conv", {"key": "conversation"})
    assert (conv["exact_duplicates"], conv["near_duplicates"]) == (0, 20)


# --- select (DSIR) ------------------------------------------------------------------------------------------


def test_gumbel_top_k_samples_proportionally_without_replacement():
    logw = np.log([1.0, 2.0, 3.0, 4.0])
    firsts = [int(gumbel_top_k(logw, 1, seed)[0]) for seed in range(20000)]
    freq = [firsts.count(i) / 20000 for i in range(4)]
    assert freq == pytest.approx([0.1, 0.2, 0.3, 0.4], abs=0.015)
    # k = 2: P[{0, 1}] = p0·p1/(1−p0) + p1·p0/(1−p1) = 0.02/0.9 + 0.02/0.8 = 0.04722
    pairs = [tuple(gumbel_top_k(logw, 2, seed)) for seed in range(20000)]
    assert pairs.count((0, 1)) / 20000 == pytest.approx(0.02 / 0.9 + 0.02 / 0.8, abs=0.006)
    assert all(len(set(p)) == 2 for p in pairs)


def _family_docs(rng: random.Random, vocab: list[str], shared: list[str], n: int) -> list[str]:
    return [" ".join(rng.choice(vocab) if rng.random() < 0.7 else rng.choice(shared) for _ in range(40))
            for _ in range(n)]


def test_select_cli_moves_the_pool_towards_the_target_family(tmp_path):
    rng = random.Random(0)
    syllables = [a + b for a in "ptkmn" for b in "aeiou"]
    family_a = ["".join(rng.choice(syllables) for _ in range(3)) for _ in range(150)]
    family_b = [w.upper() + "x" for w in family_a]  # same shapes, disjoint tokens (case is folded: +x)
    shared = ["the", "and", "of", "to", "in", "is", "it", "that"]
    pool = [(d, "a") for d in _family_docs(rng, family_a, shared, 200)] + \
           [(d, "b") for d in _family_docs(rng, family_b, shared, 200)]
    rng.shuffle(pool)
    records = [{"messages": [{"role": "user", "content": d}, {"role": "assistant", "content": "ok"}], "family": f}
               for d, f in pool]
    target = [{"prompt": d, "response": "ok"} for d in _family_docs(random.Random(9), family_a, shared, 30)]
    data, target_file = _write_jsonl(tmp_path / "pool.jsonl", records), _write_jsonl(tmp_path / "t.jsonl", target)
    proc = stagecraft_data("select", data, "-o", tmp_path / "out", "--target", target_file, "--k", "150",
                           "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    selected = _jsonl(tmp_path / "out/kept.jsonl")
    share_a = sum(r["family"] == "a" for r in selected) / len(selected)
    assert len(selected) == 150 and share_a >= 0.95  # raw pool: 0.5
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["kl_target_selected"] < 0.6 * report["kl_target_raw"]
    assert report["kl_reduction"] == pytest.approx(report["kl_target_raw"] - report["kl_target_selected"])
    assert report["selected"] == 150 and report["target_records"] == 30
    # Selected records keep input order; the same seed reproduces the file byte for byte.
    positions = [records.index(r) for r in selected]
    assert positions == sorted(positions)
    run_tool("select", [data], tmp_path / "again", {"target": [str(target_file)], "k": 150, "seed": 3})
    assert (tmp_path / "again/kept.jsonl").read_bytes() == (tmp_path / "out/kept.jsonl").read_bytes()
    other = run_tool("select", [data], tmp_path / "other", {"target": [str(target_file)], "k": 150, "seed": 4})
    assert (tmp_path / "other/kept.jsonl").read_bytes() != (tmp_path / "out/kept.jsonl").read_bytes()
    assert other["kl_reduction"] > 0.4 * other["kl_target_raw"]
    assert math.isfinite(report["log_weight"]["selected_mean"])
    assert report["log_weight"]["selected_mean"] > report["log_weight"]["raw_mean"]
