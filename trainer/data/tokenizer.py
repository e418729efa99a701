"""Tokenizers: a user's local Hugging Face tokenizer, or a small one trained on the synthetic tasks.

The embedded tokenizer lets the demo recipe run with no downloads: a SentencePiece BPE model is
trained on `synthetic.corpus_text(seed)` in well under a second, cached on disk, and wrapped as a
`transformers` fast tokenizer so every later stage (chat templating, `save_pretrained` into each
stage's `hf/` export, `AutoTokenizer.from_pretrained`) treats it like any hub tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from trainer.data.synthetic import CHAT_MARKERS, corpus_text

# Bump when anything that changes the trained model or its wrapping changes: it invalidates caches.
FORMAT_VERSION = 1
MODEL_FILE = "spm.model"
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
END_OF_TURN = "<|end|>"

# One turn is `<|role|>\n{content}<|end|>\n`; the generation prompt is the assistant header alone, so
# the model's completion is `{content}<|end|>` and greedy decoding stops at eos_token = <|end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory, never from the network.

    A pad token is required by `collate`; many causal-LM tokenizers have none, and reusing eos is
    harmless because padded positions are excluded by the loss and attention masks.
    """
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.chat_template is None:
        raise ValueError(
            f"tokenizer at {path} has no chat_template; chat data cannot be rendered. Use a chat/instruct "
            "tokenizer, set `chat_template` in its tokenizer_config.json, or use the embedded tokenizer"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer at {path} has neither pad_token nor eos_token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_embedded_tokenizer(vocab_size: int, cache_dir: str | Path, seed: int = 0,
                             corpus: str = "tasks") -> PreTrainedTokenizerBase:
    """Train (or reuse from cache) a SentencePiece BPE tokenizer and wrap it for `transformers`.

    Training: BPE (trains ~20x faster than unigram here and keeps whole template words such as
    "Reverse" as one token), `byte_fallback` so no text is ever `<unk>`, identity normalisation and no
    dummy prefix so decode(encode(text)) == text exactly, the chat markers as user-defined symbols.
    `vocab_size` must cover 8 special pieces + 256 bytes + the corpus characters (~331 in all); a value
    just above that keeps the random letters of the tasks as single-character tokens.

    Wrapping: `PreTrainedTokenizerFast` (in transformers 5.x an alias of `TokenizersBackend`) over a
    `tokenizers.Tokenizer` built here from the spm pieces. Why not `LlamaTokenizer(vocab_file=...)`:
    its 5.x `__init__` builds its own pipeline that prepends "▁" to the first word (spm's dummy
    prefix, which we train without), so it would segment differently from the trained model. Built
    explicitly, the pipeline reproduces spm's segmentation exactly (tested), `save_pretrained` writes
    tokenizer.json + chat_template.jinja, and `AutoTokenizer.from_pretrained` reloads the same thing.
    """
    lines = corpus_text(seed, corpus=corpus)
    key = _cache_key(vocab_size, seed, lines)
    final = Path(cache_dir) / key
    if not (final / MODEL_FILE).is_file():
        _train_into_cache(lines, vocab_size, final)
    return _wrap(final / MODEL_FILE)


def _cache_key(vocab_size: int, seed: int, lines: list[str]) -> str:
    payload = json.dumps({"format": FORMAT_VERSION, "vocab_size": vocab_size, "seed": seed, "corpus": lines})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _train_into_cache(lines: list[str], vocab_size: int, final: Path) -> None:
    """Train into a private temp dir, then rename it into place.

    A directory rename is atomic, so a reader sees either no cache entry or a complete one. When
    several ranks race, each trains (it takes well under a second) and all but the first rename fail;
    the losers discard their copy and use the winner's, which is identical because training is
    deterministic (single-threaded, no sampling).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        train_sentencepiece(lines, vocab_size, tmp / MODEL_FILE)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MODEL_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train_sentencepiece(lines: list[str], vocab_size: int, model_file: Path) -> None:
    """Train the spm model; a separate function so tests can count how often training happens."""
    try:
        _spm_train(lines, vocab_size, model_file)
    except RuntimeError as e:  # e.g. "Vocabulary size is smaller than required_chars. 320 vs 331."
        raise ValueError(f"embedded tokenizer: cannot train with vocab_size={vocab_size}: {e}") from e


def _spm_train(lines: list[str], vocab_size: int, model_file: Path) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(model_file.with_suffix("")),
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        user_defined_symbols=list(CHAT_MARKERS),
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece=PAD,
        unk_piece=UNK,
        bos_piece=BOS,
        eos_piece=EOS,
        num_threads=1,
        minloglevel=2,
    )


def _wrap(model_file: Path) -> PreTrainedTokenizerFast:
    """Rebuild the spm BPE model as a `tokenizers` pipeline with identical segmentation."""
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    reserved = {
        i for i, piece in enumerate(pieces)
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or piece in CHAT_MARKERS
    }
    normal = {piece for i, piece in enumerate(pieces) if i not in reserved}
    # spm BPE orders learned pieces by merge rank, so a piece's id is the rank of the merge that makes
    # it. Reserved pieces get no merges: text such as "<0x41>" must not merge into the byte token.
    merges = []
    for i, piece in enumerate(pieces):
        if i in reserved:
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal]
        merges += sorted(splits, key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))

    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True, byte_fallback=True))
    # spm's whitespace handling: spaces become "▁" and pieces never span a word boundary.
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = (PAD, UNK, BOS, EOS, *CHAT_MARKERS)
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=END_OF_TURN,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens=list(CHAT_MARKERS),
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
