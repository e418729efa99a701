"""LongWriter-style synthetic SFT data with known lengths: the length filter's showcase and test bed.

Each record is a chat ``{"messages": [user instruction, assistant response]}``; English or Chinese, with
or without a length requirement in one of the phrasings real instructions use (``2,000-word``,
``(at least 1500 words)``, ``between 300 and 500 words``, ``字数要求：不少于5000字``, ``800字左右``,
``三千字``, ``1.5万字``, ``3000到5000字``), and distractor numbers in those without (a year, a count of
people, "5 key points"). Responses are built unit by unit, so their LongWriter length is known, not
measured: ``produced = round(required · ratio)`` with ``ratio = exp(N(0, sigma))`` for a normal response
and ``U(0.2, 0.5)`` for a truncated one (probability ``p_truncated``), the failure LongWriter's filter
exists to catch. The ground truth comes back beside the records (`Truth`), never inside them, so the
records are exactly what a user's data looks like.

Deterministic: every draw comes from one ``random.Random(seed)``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

_EN_WORDS = ("the", "river", "light", "history", "people", "quiet", "market", "winter", "garden", "idea",
             "change", "city", "ocean", "memory", "small", "future", "road", "music", "science", "village",
             "careful", "bright", "story", "window", "mountain", "letter", "energy", "simple", "world", "time")
_ZH_CHARS = "的一是在人有我他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长"
_EN_TOPICS = ("climate change", "the history of tea", "urban gardening", "machine learning", "the deep ocean",
              "space travel", "public libraries", "friendship")
_ZH_TOPICS = ("气候变化", "茶的历史", "城市园艺", "人工智能", "深海", "太空旅行", "公共图书馆", "友谊")

# (template, kind): kind "n" takes {n}, "range" takes {lo} {hi}, "zh_numeral" {zn}, "wan" {w}, None no length.
_EN_ASK = (("Write a {n:,}-word essay about {topic}.", "n"),
           ("Write an article about {topic} in about {n} words.", "n"),
           ("Please write a story about {topic} (at least {n} words).", "n"),
           ("Write a blog post about {topic}. It should be between {lo} and {hi} words long.", "range"),
           ("Compose a {lo}-{hi} word report on {topic}.", "range"),
           ("Word count: {n}. Write a feature article on {topic}.", "n"))
_EN_FREE = ("Write an essay about {topic}.",
            "In {year}, {k} people joined a club about {topic}. Write a short history of the club.",
            "Explain {topic} to a 10-year-old.",
            "Give 5 key points about {topic}, then discuss each one.")
_ZH_ASK = (("请写一篇关于{topic}的文章，字数要求：不少于{n}字。", "n"),
           ("写一篇{n}字左右的关于{topic}的说明文。", "n"),
           ("以{topic}为题，写一篇{zn}字的散文。", "zh_numeral"),
           ("写一篇关于{topic}的报告，{lo}到{hi}字。", "range"),
           ("写一篇{w}万字的关于{topic}的长篇小说。", "wan"))
_ZH_FREE = ("请写一篇关于{topic}的文章。",
            "{year}年{topic}的发展情况如何？请介绍一下。",
            "请列出5个关于{topic}的要点，并逐一说明。")


@dataclass(frozen=True)
class Truth:
    """What the generator put into one record: the language, the asked length (a range's midpoint;
    None when nothing is asked), the response's LongWriter length, and the instruction template."""

    language: str
    required: int | None
    produced: int
    template: str


def chinese_number(n: int) -> str:
    """``n`` (0 < n < 10^8) in Chinese numerals: 2500 -> 两千五百, 10500 -> 一万零五百, 30000 -> 三万."""
    digits = "零一二三四五六七八九"

    def section(k: int, lead: bool) -> str:  # 0 < k < 10^4; `lead`: the numeral starts here
        out, pending_zero = "", False
        for unit, char in ((1000, "千"), (100, "百"), (10, "十"), (1, "")):
            d, k = divmod(k, unit)
            if d == 0:
                pending_zero = bool(out)
                continue
            if pending_zero:
                out += "零"
                pending_zero = False
            if d == 2 and unit >= 1000 and not out:
                out += "两"
            elif not (d == 1 and unit == 10 and not out and lead):
                out += digits[d]
            out += char
        return out

    high, low = divmod(n, 10000)
    if not high:
        return section(low, True)
    head = ("两" if high == 2 else section(high, True)) + "万"
    if not low:
        return head
    return head + ("零" if low < 1000 else "") + section(low, False)


def _english(rng: random.Random, units: int) -> str:
    """`units` words in sentences of 6-14, with a bracketed year now and then (LongWriter counts it 0)."""
    words, sentences, i = rng.choices(_EN_WORDS, k=units), [], 0
    while i < units:
        sentence = words[i:i + rng.randint(6, 14)]
        i += len(sentence)
        year = f" ({rng.randint(1900, 2030)})" if rng.random() < 0.1 else ""
        sentences.append(" ".join([sentence[0].capitalize(), *sentence[1:]]) + year + ".")
    return " ".join(sentences)


def _chinese(rng: random.Random, units: int) -> str:
    """`units` ideographs in clauses of 8-24 ended by ，/。, now and then a digit group (both count 0)."""
    chars, clauses, i = rng.choices(_ZH_CHARS, k=units), [], 0
    while i < units:
        clause = chars[i:i + rng.randint(8, 24)]
        i += len(clause)
        clauses.append("".join(clause) + (f"{rng.randint(1, 99)}。" if rng.random() < 0.1 else rng.choice("，。")))
    return "".join(clauses)


def _ask(rng: random.Random, language: str, min_required: int, max_required: int) -> tuple[str, int, str]:
    """(instruction, required, template) for a request with a length."""
    template, kind = rng.choice(_EN_ASK if language == "en" else _ZH_ASK)
    first_wan = max(10000, -(-min_required // 5000) * 5000)  # the smallest multiple of 5000 allowed
    if kind == "wan" and first_wan > max_required:  # no 万 amount in range: another Chinese phrasing
        template, kind = rng.choice([t for t in _ZH_ASK if t[1] != "wan"])
    if kind == "wan":
        required = rng.randrange(first_wan, max_required + 1, 5000)
    else:
        required = rng.randrange(-(-min_required // 100) * 100, max_required + 1, 100)
    half = 100 * rng.randint(1, max(1, required // 400))  # a range required ± half, midpoint `required`
    topic = rng.choice(_EN_TOPICS if language == "en" else _ZH_TOPICS)
    text = template.format(n=required, lo=required - half, hi=required + half, zn=chinese_number(required),
                           w=f"{required / 10000:g}", topic=topic)
    return text, required, template


def generate(n: int, seed: int, p_requirement: float = 0.8, p_chinese: float = 0.5, min_required: int = 200,
             max_required: int = 3000, sigma: float = 0.3, p_truncated: float = 0.1) -> tuple[list[dict], list[Truth]]:
    """`n` chat records and their ground truth. Asked lengths are multiples of 100 in
    [min_required, max_required] (multiples of 5000 for the 万 phrasing, used when max_required >= 10000)."""
    if min_required < 100 or max_required < min_required:
        raise ValueError(f"need 100 <= min_required <= max_required, got {min_required}, {max_required}")
    rng = random.Random(seed)
    records, truths = [], []
    for _ in range(n):
        language = "zh" if rng.random() < p_chinese else "en"
        if rng.random() < p_requirement:
            text, required, template = _ask(rng, language, min_required, max_required)
            ratio = rng.uniform(0.2, 0.5) if rng.random() < p_truncated else math.exp(rng.gauss(0.0, sigma))
            produced = max(1, round(required * ratio))
        else:
            template = rng.choice(_EN_FREE if language == "en" else _ZH_FREE)
            topic = rng.choice(_EN_TOPICS if language == "en" else _ZH_TOPICS)
            text = template.format(topic=topic, year=rng.randint(1990, 2025), k=rng.randint(3, 60))
            required, produced = None, rng.randint(min_required, max_required)
        response = (_english if language == "en" else _chinese)(rng, produced)
        records.append({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": response}]})
        truths.append(Truth(language, required, produced, template))
    return records, truths
