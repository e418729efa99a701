"""Length in LongWriter's unit: what a response produced, and what an instruction asked for.

LongWriter (Bai et al. 2024) measures a response by one count for both languages: each CJK ideograph
(U+4E00–U+9FFF) plus each English word matched by ``\\b[a-zA-Z]+\\b``. `produced_length` is that count,
exactly as their evaluation script computes it, quirks included (see its docstring). `required_length`
reads the length an instruction asks for in the same unit, so the two can be compared by
`trainer.data.length_score` (S_l) and by the length filter (trainer/curation/length_filter.py).

The rules of `required_length`, each pinned by a phrasing in tests/test_curation.py:

- A requirement is a number followed by a length unit: ``word``/``words`` (also ``2,000-word``,
  ``2000+ words``), ``字``, ``词``, ``个字``, ``汉字``, ``字符``, ``Chinese characters``. ``词`` is a word
  and ``字``/``字符`` a character, the two halves of the one LongWriter count.
- Not a length unit, so not a requirement: ``characters`` alone (letters, ~5–6 per English word, a
  ratio no count here can honour), ``tokens`` (tokenizer-dependent), ``pages``, ``sentences``,
  ``paragraphs``. A number with no unit (a year, a count of people) is not a requirement either, except
  after a length noun: ``字数要求：5000``, ``word count: 800``.
- Numbers: Arabic with or without ``,`` thousands separators, decimals, a ``k``/``千``/``万`` multiplier
  (``5k``, ``3千``, ``1.5万``); Chinese numerals 零〇一二两三四五六七八九 十 百 千 万, with the colloquial
  ``两千五`` = 2500 and ``一万五`` = 15000, and a lone ``千``/``万`` (``千字文``, ``万字长文``).
- Fillers between number and unit are allowed: ``多``/``余`` (``三千多字`` = 3000), ``+``.
- A range (``3000-5000 words``, ``between 300 and 500 words``, ``3000到5000字``, ``1-2万字``) asks for
  its midpoint, rounded half up: the filter scores against the centre of what was allowed. A
  multiplier on the upper end only also applies to the lower end when the lower number is the smaller
  (``1-2万`` = 10000–20000, but ``5000-1万`` = 5000–10000).
- Not requirements, though they look like one: a vague amount (``几千字``, ``数千字``, ``上万字``), a
  per-part length (``每章1000字``, ``100 words each``), a length of a text the instruction quotes
  (``this 5000-word article``), a rate (``60 words per minute``), a count of items (``list 10 words``, ``words that rhyme``), anything under 10 (``四字成语``,
  ``in 3 words``: too short for S_l to be meaningful, and mostly not a length at all).
- Several requirements: the first marked as a total (``总字数``, ``in total``) wins, else the first in
  reading order (``a 2000-word essay; the introduction about 200 words`` asks for 2000).

Not recognised (returns None): English number words (``five hundred words``; ``a thousand words`` is
more often an idiom than a request), digit-by-digit Chinese numerals (``五〇〇〇字``).
"""

from __future__ import annotations

import math
import re

# --- produced length ---------------------------------------------------------------------------------------

_CJK = re.compile(r"[\u4e00-\u9fff]")
_ENGLISH_WORD = re.compile(r"\b[a-zA-Z]+\b")


def produced_length(text: str) -> int:
    """LongWriter's length of ``text``: CJK ideographs (U+4E00–U+9FFF) plus ``\\b[a-zA-Z]+\\b`` words.

    Kept exactly as LongWriter's ``count_words`` so S_l values match theirs. What that regex implies:
    ``don't`` is two words; digits, punctuation and CJK punctuation count 0; and since Python's
    ``\\b`` is Unicode-aware, a Latin word glued to a CJK character or an accented letter (``用Python写``,
    ``café``) is not a match at all, while ``用 Python 写`` counts Python once.
    """
    return len(_CJK.findall(text)) + len(_ENGLISH_WORD.findall(text))


# --- Chinese numerals --------------------------------------------------------------------------------------

_ZH_DIGIT = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8,
             "九": 9}
_ZH_UNIT = {"十": 10, "百": 100, "千": 1000}
_ZH_CHARS = "".join(_ZH_DIGIT) + "".join(_ZH_UNIT) + "万"


def chinese_numeral(text: str) -> int | None:
    """The value of a Chinese numeral such as ``三千五百`` (3500), ``两万`` (20000); None if ill-formed.

    Grammar: ``[section 万] section``, a section being digits each followed by a falling unit
    (千 > 百 > 十), with 零 marking a skipped unit. ``十五`` = 15 (a leading 十 means 一十). A trailing
    digit straight after a unit is the colloquial abbreviation of the next unit down: ``两千五`` = 2500,
    ``一万五`` = 15000. A lone ``百``/``千``/``万`` is that number; ``万一`` ("in case") or ``三五``
    (colloquial "three or five") is not a numeral.
    """
    if text in ("百", "千", "万"):
        return {"百": 100, "千": 1000, "万": 10000}[text]
    total, section, digit = 0, 0, None
    last_unit = 10**9  # the unit the previous digit was multiplied by, within this section
    zero_seen = False
    for i, ch in enumerate(text):
        if ch in _ZH_DIGIT:
            if digit is not None:
                return None  # two digits in a row
            digit = _ZH_DIGIT[ch]
            zero_seen = zero_seen or digit == 0
            if digit == 0:
                digit = None
        elif ch in _ZH_UNIT:
            unit = _ZH_UNIT[ch]
            if digit is None and not (ch == "十" and i == 0):
                return None
            if unit >= last_unit:
                return None
            section += (1 if digit is None else digit) * unit
            digit, last_unit, zero_seen = None, unit, False
        else:  # 万
            if total or (section == 0 and digit is None):
                return None
            total = (section + (digit or 0)) * 10000
            section, digit, last_unit, zero_seen = 0, None, 10000, False
    if digit is not None:
        # "两千五": the last digit follows a unit directly, so it counts in the unit below it.
        step = last_unit // 10 if last_unit <= 10000 and not zero_seen else 1
        section += digit * max(step, 1)
    return total + section


# --- required length ---------------------------------------------------------------------------------------

# Below this a "length" is an item count or an idiom (四字成语, 一字不差), never a long-writing request.
MIN_REQUIRED = 10

_ARABIC = r"(?<![0-9A-Za-z.,])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
_MULT = r"(?:\s?[kK](?![A-Za-z])|万|千)?"
_NUMBER = rf"(?:{_ARABIC}{_MULT}|[{_ZH_CHARS}]+)"
_FILLER = r"(?:\s*\+|多|余|餘)?"
# 字 as a unit, not the 字 of 十字路口 (crossroads), 十字架 (cross), 八字形 ...
_ZH_UNIT_RE = r"个?(?:中文)?(?:汉字|字符|字(?![路架形军街绣星花口型])|词)"
_EN_UNIT_RE = r"(?:\s*-\s*|\s*)(?:words?\b|chinese\s+characters?\b)"
_UNIT = rf"(?:{_ZH_UNIT_RE}|{_EN_UNIT_RE})"
_SEP = r"(?:-|–|—|~|～|〜|至|到|\bto\b|\bor\b|\band\b)"
_LENGTH_NOUN = r"(?:字数|篇幅|word[\s-]+count|word\s+limit|number\s+of\s+words)"
_NOUN_FILLER = (r"(?:\s|:|：|,|，|要求|限制|控制|需要|需|应该|应|必须|在|为|是|达到|不少于|不低于|不超过|不多于|"
                r"至少|最少|最多|大约|约|大概|of|is|about|around|approximately|roughly|at\s+least|at\s+most|"
                r"no\s+(?:less|more|fewer)\s+than|under|over|should\s+be|must\s+be)*")

_PATTERN = re.compile(
    rf"(?P<between>\bbetween\s+)?(?P<a>{_NUMBER}){_FILLER}\s*(?:{_UNIT}\s*)?(?P<sep>{_SEP})\s*"
    rf"(?P<b>{_NUMBER}){_FILLER}\s*(?P<unit_r>{_UNIT})"
    rf"|(?P<n>{_NUMBER}){_FILLER}\s*(?P<unit>{_UNIT})"
    rf"|{_LENGTH_NOUN}{_NOUN_FILLER}(?P<na>{_NUMBER})(?:\s*{_SEP}\s*(?P<nb>{_NUMBER}))?",
    re.IGNORECASE,
)

# Cues in a window before (or just after) a match. Window: 16 characters, enough for "for each
# section, " or "每个章节" but short enough not to reach back into an earlier clause.
_WINDOW = 16
_PARTS_ZH = r"(?:章|段|节|部分|篇|小节|回|集|条|页|首|题|个|分钟|秒|小时|天|日|周|月)"
_PER_PART_BEFORE = re.compile(
    rf"(?:每|各)(?:一|个)?{_PARTS_ZH}[^，。,.;；:：！？!?]{{0,6}}$|\b(?:each|every|per)\s+\w+[^.;:,!?]{{0,10}}$",
    re.IGNORECASE)
_PER_PART_AFTER = re.compile(r"\s*(?:each|apiece|per\s+\w+|a\s+(?:minute|second|hour|day)|/\s*\w+)\b",
                             re.IGNORECASE)
_TOTAL_BEFORE = re.compile(r"总|一共|共计|全文|全篇|整篇|\btotal\b|\boverall\b|\baltogether\b", re.IGNORECASE)
_TOTAL_AFTER = re.compile(r"\s*(?:in\s+total|total|overall|altogether)\b", re.IGNORECASE)
_QUOTED_TEXT_BEFORE = re.compile(
    r"(?:\bthis|\bthat|\bthese|\bthose|\bthe\s+following|\bthe\s+above|\battached|\bgiven|\bprovided|"
    r"\boriginal|这篇|(?<!应)该|上述|以下|原文)\s*(?:a\s+|an\s+)?$", re.IGNORECASE)
# Verbs that take a count of items, never a length ("give me 500 words on X" is a length, so not "give").
_ITEM_COUNT_BEFORE = re.compile(
    r"(?:\blist|\bname|\bsuggest|\bbrainstorm|\bidentify|\bcome\s+up\s+with|列出|列举|举出)\s*"
    r"(?:me\s+|the\s+)?(?:top\s+)?$", re.IGNORECASE)
_ITEM_COUNT_AFTER = re.compile(
    r"\s+(?:(?:that|which)\s+(?:rhyme|start|begin|end|mean|describe|contain|are|have)|starting|beginning|"
    r"ending|rhyming|related|meaning|similar|associated|describing)\b", re.IGNORECASE)


def _split(token: str) -> tuple[float, int] | None:
    """A number token as (value before its multiplier, multiplier): ``1.5万`` -> (1.5, 10000),
    ``五千`` -> (5, 1000), ``2,000`` -> (2000, 1); None for an ill-formed Chinese numeral."""
    token = token.strip()
    if token[0] in _ZH_CHARS:
        value = chinese_numeral(token)
        if value is None:
            return None
        multiplier = {"千": 1000, "万": 10000}.get(token[-1], 1) if len(token) > 1 else 1
        return value / multiplier, multiplier
    multiplier = {"k": 1000, "K": 1000, "千": 1000, "万": 10000}.get(token[-1], 1)
    if multiplier > 1:
        token = token[:-1].strip()
    return float(token.replace(",", "")), multiplier


def _number(token: str) -> float | None:
    parts = _split(token)
    return None if parts is None else parts[0] * parts[1]


def _range_ends(a: str, b: str) -> tuple[float, float] | None:
    """Both ends of a range. A multiplier written on the upper end only (``1-2万``, ``3-5k``,
    ``三到五千``) applies to the lower end too when the lower number, read bare, is not larger."""
    lo, hi = _split(a), _split(b)
    if lo is None or hi is None:
        return None
    (lo_value, lo_mult), (hi_value, hi_mult) = lo, hi
    if lo_mult == 1 and hi_mult > 1 and lo_value <= hi_value:
        lo_mult = hi_mult
    return lo_value * lo_mult, hi_value * hi_mult


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _excluded(text: str, start: int, end: int) -> bool:
    before = text[max(0, start - _WINDOW):start]
    after = text[end:end + _WINDOW + 8]
    if text[start] in _ZH_CHARS and before[-1:] in ("几", "数", "上"):
        return True  # 几千字, 数千字, 上万字: "some thousands", a vague amount, not a length to score against
    return bool(_PER_PART_BEFORE.search(before) or _PER_PART_AFTER.match(after)
                or _QUOTED_TEXT_BEFORE.search(before) or _ITEM_COUNT_BEFORE.search(before)
                or _ITEM_COUNT_AFTER.match(after))


def _is_total(text: str, start: int, end: int) -> bool:
    return bool(_TOTAL_BEFORE.search(text[max(0, start - _WINDOW):start]) or _TOTAL_AFTER.match(text[end:]))


def _value(match: re.Match) -> int | None:
    """The length one match asks for, or None if it is not a length request."""
    if match.group("n") is not None:
        value = _number(match.group("n"))
    else:
        a, b = (match.group("a"), match.group("b")) if match.group("a") is not None else (
            match.group("na"), match.group("nb"))
        if match.group("a") is not None and match.group("sep").lower() == "and" and not match.group("between"):
            return None  # "2 and 500 words" is two things, not a range; a range with "and" says "between"
        if b is None:
            value = _number(a)
        else:
            ends = _range_ends(a, b)
            value = None if ends is None else (ends[0] + ends[1]) / 2
    if value is None:
        return None
    value = _round_half_up(value)
    return value if value >= MIN_REQUIRED else None


def required_length(instruction: str) -> int | None:
    """The length ``instruction`` asks for, in LongWriter's unit (words / 字), or None. Rules: module doc."""
    found: list[tuple[bool, int]] = []
    for match in _PATTERN.finditer(instruction):
        start, end = match.span()
        if match.group("between"):
            start = match.start("a")
        if _excluded(instruction, start, end):
            continue
        value = _value(match)
        if value is not None:
            found.append((_is_total(instruction, start, end), value))
    if not found:
        return None
    totals = [value for is_total, value in found if is_total]
    return totals[0] if totals else found[0][1]
