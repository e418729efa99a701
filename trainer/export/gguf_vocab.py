"""The tokenizer of an HF export, as llama.cpp reads it from GGUF metadata.

llama.cpp reimplements two tokenizer families, chosen by ``tokenizer.ggml.model``:

- ``"llama"`` (SentencePiece): text has its spaces replaced by "▁" and is split into characters;
  adjacent symbols are merged while their concatenation is a token, highest ``tokenizer.ggml.scores``
  first; what is left unknown falls back to ``<0xNN>`` byte tokens. The embedded tokenizer
  (trainer/data/tokenizer.py) is a SentencePiece BPE model exported as a ``tokenizers`` BPE with
  ``byte_fallback``, and so are Llama-2's and Mistral's tokenizer.json. Their tokenizer.json carries
  merges, not scores: BPE applies the lowest-ranked merge first, so a token's score here is minus the
  rank of the first merge that makes it, which makes "highest score first" the same order.
- ``"gpt2"`` (byte-level BPE: Llama-3, Qwen2): tokens are the byte-level strings, ``merges`` the ranked
  pairs, and ``tokenizer.ggml.pre`` names the pre-tokenizer regex, which llama.cpp compiles in rather
  than reads: llama.cpp's convert_hf_to_gguf.py picks the name by hashing a test string's tokens; here
  it is picked by the regex itself, and an unknown one is refused rather than guessed.

Anything else (Unigram, WordPiece, a BPE without byte fallback or byte-level) is refused, naming the
file and what it holds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from trainer.runtime.errors import BadInput

# llama.cpp's token types (gguf.TokenType), written as plain ints.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# tokenizer.json pre-tokenizer regex -> the name llama.cpp knows it by (``tokenizer.ggml.pre``).
_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_HEAD = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+"
PRE_TOKENIZERS = {
    _HEAD + r"|\p{N}{1,3}" + _TAIL: "llama-bpe",  # Llama-3
    _HEAD + r"|\p{N}" + _TAIL: "qwen2",  # Qwen2 / Qwen2.5
}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class Vocab:
    """What is written under ``tokenizer.ggml.*``; ``tokens`` has one entry per embedding row."""

    model: str  # "llama" or "gpt2"
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None  # "llama" only
    merges: list[str] | None = None  # "gpt2" only
    pre: str | None = None  # "gpt2" only
    add_space_prefix: bool = False  # "llama" only


def read_vocab(hf_dir: Path, n_vocab: int) -> Vocab:
    """The vocabulary of ``hf_dir/tokenizer.json``, padded with unused tokens to the model's
    ``n_vocab`` embedding rows (llama.cpp requires one token per row)."""
    path = Path(hf_dir) / "tokenizer.json"
    if not path.is_file():
        raise BadInput(f"{path}: not found; GGUF export reads the tokenizer from tokenizer.json "
                       "(a transformers fast tokenizer, as every stagecraft export has)")
    spec = json.loads(path.read_text())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise BadInput(f"{path}: model.type {model.get('type')!r}; only BPE tokenizers (SentencePiece BPE with "
                       "byte fallback, or byte-level BPE) can be written for llama.cpp")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    vocab.update({content: t["id"] for content, t in added.items()})
    size = max(vocab.values()) + 1
    if size > n_vocab:
        raise BadInput(f"{path}: {size} tokens but config.json vocab_size is {n_vocab}; the embedding has fewer "
                       "rows than the tokenizer has ids")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = NORMAL
    for content, t in added.items():
        types[t["id"]] = CONTROL if t.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    if model.get("byte_fallback"):
        return _sentencepiece(path, spec, tokens, types, merges, model.get("unk_token"), vocab)
    if _is_byte_level(spec.get("pre_tokenizer")):
        return Vocab("gpt2", tokens, types, merges=merges, pre=_pre_name(path, spec["pre_tokenizer"]))
    raise BadInput(f"{path}: a BPE tokenizer that is neither SentencePiece-style (model.byte_fallback) nor "
                   "byte-level (a ByteLevel pre_tokenizer); llama.cpp has no tokenizer for it")


def _sentencepiece(path: Path, spec: dict, tokens: list[str], types: list[int], merges: list[str],
                   unk: str | None, vocab: dict[str, int]) -> Vocab:
    for i, text in enumerate(tokens):
        if types[i] == NORMAL and _BYTE_TOKEN.fullmatch(text):
            types[i] = BYTE
    if unk in vocab:
        types[vocab[unk]] = UNKNOWN
    # Tokens no merge makes (characters, bytes, specials) rank below every merged one; llama.cpp never
    # forms them by merging, so only their order among themselves (id order) is kept.
    scores = [-float(len(merges) + i) for i in range(len(tokens))]
    for rank, merge in reversed(list(enumerate(merges))):  # reversed: the first (lowest) rank wins
        left, right = merge.split(" ", 1)
        token = vocab.get(left + right)
        if token is not None:
            scores[token] = -float(rank)
    return Vocab("llama", tokens, types, scores=scores, add_space_prefix=_adds_space_prefix(path, spec))


def _adds_space_prefix(path: Path, spec: dict) -> bool:
    """Whether the tokenizer puts "▁" before the text (Llama-2's ``Prepend``, or a Metaspace that
    prepends); the embedded tokenizer is trained without that dummy prefix."""
    def walk(node) -> list[dict]:
        if not isinstance(node, dict):
            return []
        inner = node.get("normalizers") or node.get("pretokenizers") or []
        return [node, *[n for child in inner for n in walk(child)]]

    nodes = walk(spec.get("normalizer")) + walk(spec.get("pre_tokenizer"))
    for node in nodes:
        if node.get("type") == "Prepend" and node.get("prepend") == "▁":
            return True
        if node.get("type") == "Metaspace":
            scheme = node.get("prepend_scheme", "always" if node.get("add_prefix_space", True) else "never")
            if scheme == "first":
                raise BadInput(f"{path}: Metaspace prepend_scheme 'first' has no llama.cpp equivalent")
            return scheme == "always"
    return False


def _is_byte_level(pre) -> bool:
    if not isinstance(pre, dict):
        return False
    return pre.get("type") == "ByteLevel" or any(_is_byte_level(p) for p in pre.get("pretokenizers", []))


def _pre_name(path: Path, pre: dict) -> str:
    """llama.cpp's name for the pre-tokenizer: a ByteLevel that splits with its own (GPT-2) regex is
    "gpt-2"; a Split with a regex is looked up in :data:`PRE_TOKENIZERS`."""
    if pre.get("type") == "ByteLevel":
        if pre.get("use_regex", True):
            return "gpt-2"
        raise BadInput(f"{path}: a ByteLevel pre_tokenizer without a split regex is not supported")
    splits = [p for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
    if len(splits) == 1:
        regex = splits[0].get("pattern", {}).get("Regex")
        if regex in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[regex]
        raise BadInput(f"{path}: pre_tokenizer regex {regex!r} is not one llama.cpp implements under a known name "
                       f"(supported: {', '.join(sorted(PRE_TOKENIZERS.values()))}, gpt-2)")
    if not splits and any(p.get("type") == "ByteLevel" and p.get("use_regex", True)
                          for p in pre.get("pretokenizers", [])):
        return "gpt-2"
    raise BadInput(f"{path}: pre_tokenizer {pre.get('type')} with {len(splits)} Split steps is not supported")


def write_vocab(writer, vocab: Vocab, tokenizer) -> None:
    """Add the ``tokenizer.*`` keys to a ``gguf.GGUFWriter``. ``tokenizer`` (the transformers one, loaded
    from the same directory) gives the special-token ids, what ``encode`` adds around a text, and the
    chat template."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
           "pad": tokenizer.pad_token_id}
    for kind, token_id in ids.items():
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    # llama.cpp adds BOS (or EOS) to a prompt only when told to; the HF tokenizer is the reference.
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and ids["bos"] is not None and probe[0] == ids["bos"])
    writer.add_add_eos_token(bool(probe) and ids["eos"] is not None and probe[-1] == ids["eos"])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
