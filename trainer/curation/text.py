"""Text normalisation, tokens and stable hashes shared by dedup, select (DSIR) and stats.

Tokens: every CJK ideograph is a token of its own (Chinese has no spaces to split words on, and one
ideograph is one unit of LongWriter's count), every other run of letters/digits is one token;
punctuation and whitespace separate tokens and are dropped. Hashes are CRC-32 of the UTF-8 text, never
Python's `hash()`, which is salted per process: a dedup or a selection must give the same answer on
every machine and every run.
"""

from __future__ import annotations

import re
import unicodedata
import zlib

_TOKEN = re.compile(r"[\u4e00-\u9fff]|[^\W_\u4e00-\u9fff]+")
_CJK = re.compile(r"[\u4e00-\u9fff]")
_LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]")


def normalize(text: str) -> str:
    """NFKC (full-width forms fold to ASCII), lower case, runs of whitespace as one space, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def tokens(text: str) -> list[str]:
    """The tokens of normalised `text` (rules: module docstring)."""
    return _TOKEN.findall(normalize(text))


def ngrams(toks: list[str], n: int) -> list[str]:
    """The n-grams of `toks` joined by a space; a text shorter than n is its one (shorter) n-gram."""
    if len(toks) < n:
        return [" ".join(toks)] if toks else []
    return [" ".join(toks[i:i + n]) for i in range(len(toks) - n + 1)]


def hash32(text: str) -> int:
    """A stable 32-bit hash (CRC-32 of UTF-8)."""
    return zlib.crc32(text.encode("utf-8"))


def script_counts(text: str) -> tuple[int, int]:
    """(CJK ideographs, Latin letters incl. accented ones) in `text`."""
    return len(_CJK.findall(text)), len(_LATIN.findall(text))
