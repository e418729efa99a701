"""Bad bytes, bad records and bad model paths end as clean errors naming the file and line, or the config key.

The fuzz tests state the contract of `read_jsonl` with every record validator: whatever a line holds,
the outcome is a valid record, a `DataError` starting with `path:line:` (or, under skip, a counted skip)
and never another exception; and every record accepted can be tokenised.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.config import CONFIG_DIR, ConfigError, register_configs
from trainer.config.paths import check_paths
from trainer.data import build_embedded_tokenizer, tokenize_chat
from trainer.data.preference import (
    HELPSTEER2_ATTRIBUTES,
    collate_reward,
    tokenize_pair,
    tokenize_reward_example,
    validate_preference_record,
    validate_reward_record,
)
from trainer.data.records import DataError, DropLog, read_jsonl, read_jsonl_lines, validate_chat_record
from trainer.models.reward import CONFIG_FILE as REWARD_CONFIG_FILE

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse: abc"},
                     {"role": "assistant", "content": "cba"}]}
PAIR_LISTS = {"prompt": [{"role": "user", "content": "Reverse: abc"}],
              "chosen": [{"role": "assistant", "content": "cba"}], "rejected": [{"role": "assistant", "content": "bca"}],
              "chosen_reward": 1.0, "rejected_reward": 0}
PAIR_STRINGS = {"prompt": "Sort: cab", "chosen": "abc", "rejected": "acb"}
SCORES = {"helpfulness": 3, "correctness": 4, "coherence": 4, "complexity": 1, "verbosity": 0.5}
REWARD = {"messages": [{"role": "user", "content": "Copy: xy"}, {"role": "assistant", "content": "xy"}],
          "attributes": SCORES}
HELPSTEER2_ROW = {"prompt": "Copy: xy", "response": "xy", **SCORES}


def _write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


# --- bytes and lines ---------------------------------------------------------------------------------------


def test_invalid_utf8_names_file_and_line_and_skip_keeps_the_rest(tmp_path: Path) -> None:
    good = json.dumps(CHAT).encode()
    bad = b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'  # latin-1 bytes, not UTF-8
    path = _write(tmp_path / "sft.jsonl", [good, bad, good])
    with pytest.raises(DataError) as info:
        read_jsonl(path, validate_chat_record)
    offset = bad.index(b"\xe9")
    assert str(info.value) == f"{path}:2: invalid UTF-8 at byte offset {offset} of the line (invalid continuation byte)"
    assert read_jsonl(path, validate_chat_record, on_bad_record="skip") == ([CHAT, CHAT], 1)


def test_read_jsonl_lines_keeps_line_numbers(tmp_path: Path) -> None:
    good = json.dumps(CHAT).encode()
    path = _write(tmp_path / "sft.jsonl", [b"\xef\xbb\xbf" + good, b"", b"  ", b"[1]", good + b"\r"])
    assert read_jsonl_lines(path, validate_chat_record, "skip") == ([(1, CHAT), (5, CHAT)], 1)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'{"messages": NaN}', "invalid JSON: NaN is not valid JSON (use null for a missing value)"),
        (b'{"x": -Infinity}', "invalid JSON: -Infinity is not valid JSON"),
        (b'{"x": "\\ud800"}', "invalid JSON: a string holds an unpaired surrogate escape"),
        (b'{"x": ' + b"9" * 5000 + b"}", "invalid JSON: Exceeds the limit (4300 digits)"),
        (b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "invalid JSON: nested too deeply"),
        (b'{"messages": [{"role": ' + b"[" * 400 + b"]" * 400 + b', "content": "x"}]}',
         "messages[0].role must be one of system, user, assistant, got [[[[[[[...]]]]]]]"),
    ],
)
def test_values_json_accepts_but_records_must_not(tmp_path: Path, line: bytes, reason: str) -> None:
    path = _write(tmp_path / "x.jsonl", [line])
    with pytest.raises(DataError) as info:
        read_jsonl(path, validate_chat_record)
    assert str(info.value).startswith(f"{path}:1: {reason}")


@pytest.mark.parametrize(
    ("validate", "record", "reason"),
    [
        (validate_preference_record, {**PAIR_STRINGS, "chosen_reward": 10**400, "rejected_reward": 0},
         "chosen_reward is too large for a float"),
        (validate_reward_record, {**REWARD, "attributes": {"helpfulness": -(10**309)}},
         "attributes.helpfulness is too large for a float"),
        (validate_reward_record, {**HELPSTEER2_ROW, "verbosity": [1]}, "verbosity must be a number, got [1]"),
        (validate_chat_record, {"messages": [{"role": 7, "content": "x"}]}, "messages[0].role must be one of"),
        (validate_preference_record, {**PAIR_STRINGS, "prompt": {"role": "user"}}, "prompt must be a string or"),
    ],
)
def test_odd_types_are_record_errors(tmp_path: Path, validate, record: dict, reason: str) -> None:
    path = _write(tmp_path / "x.jsonl", [json.dumps(record).encode()])
    with pytest.raises(DataError) as info:
        read_jsonl(path, validate)
    assert str(info.value).startswith(f"{path}:1: {reason}")


def test_drop_log_names_the_first_lines_and_counts_the_rest(caplog) -> None:
    drops = DropLog("length", limit=2)
    with caplog.at_level(logging.WARNING, logger="trainer.data.records"):
        for lineno in (3, 7, 9, 12):
            drops.add("/d/sft.jsonl", lineno, "longer than data.max_length=64")
        drops.log_summary()
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "/d/sft.jsonl:3: longer than data.max_length=64 (record dropped for length)",
        "/d/sft.jsonl:7: longer than data.max_length=64 (record dropped for length)",
        "... and 2 more records dropped for length (4 in all, the first 2 named above)",
    ]
    assert drops.count == 4
    few = DropLog("length")
    assert few.summary() == ""
    few.add("/d/x.jsonl", 1, "too long")
    assert few.summary() == "1 record dropped for length"


# --- HelpSteer2's own rows ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_embedded_tokenizer(400, tmp_path_factory.mktemp("tokenizers"))


def test_helpsteer2_row_tokenises_like_messages_and_attributes(tok) -> None:
    validate_reward_record(HELPSTEER2_ROW)
    row = {**HELPSTEER2_ROW, "verbosity": None}
    del row["coherence"]
    record = {**REWARD, "attributes": {**SCORES, "verbosity": None}}
    del record["attributes"]["coherence"]
    ours = tokenize_reward_example(tok, record, HELPSTEER2_ATTRIBUTES, 64)
    theirs = tokenize_reward_example(tok, row, HELPSTEER2_ATTRIBUTES, 64)
    assert theirs == ours
    assert theirs["target_mask"] == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert collate_reward([theirs, ours], tok.pad_token_id)["targets"].tolist()[0] == [3.0, 4.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"prompt": "q"}, "missing key 'response' (a HelpSteer2 row has 'prompt' and 'response')"),
        ({"response": "a", "helpfulness": 1}, "missing key 'prompt'"),
        ({"prompt": ["q"], "response": "a", "helpfulness": 1}, "prompt must be a string, got list"),
        ({"prompt": "q", "response": " ", "helpfulness": 1}, "response is empty"),
        ({"prompt": "q", "response": "a", "quality": 4}, "the row has no score for any of helpfulness"),
        ({"prompt": "q", "response": "a", "helpfulness": "4"}, "helpfulness must be a number, got '4'"),
        ({"text": "q"}, "missing key 'messages' (or HelpSteer2's 'prompt' and 'response'; keys: text)"),
    ],
)
def test_helpsteer2_row_reasons(record: dict, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_reward_record(record)
    assert str(info.value).startswith(reason)


# --- model and tokenizer paths -----------------------------------------------------------------------------


def _compose(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tok) -> Path:
    """A tiny Llama saved as a transformers directory with its tokenizer, as an SFT export looks."""
    path = tmp_path_factory.mktemp("hf") / "model"
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    (path / REWARD_CONFIG_FILE).write_text("{}")
    return path


@pytest.fixture(scope="module")
def configs() -> dict:
    """Composed once: compose takes about a second and the cases only change paths."""
    return {"sft": _compose(["model=hf", "model.path=/unset"]),
            "dpo": _compose(["model=hf", "model.path=/unset", "stage=dpo"]),
            "annotate": _compose(["stage=annotate", "stage.reward_model=/unset"]),
            "recipe": _compose(["recipe=demo"])}


def _break(hf: Path, tmp: Path, how: str) -> Path:
    """A copy of the valid directory with one thing wrong; returns the path to configure."""
    if how == "missing":
        return tmp / "nope"
    if how == "file":
        (tmp / "weights.bin").write_bytes(b"x")
        return tmp / "weights.bin"
    path = Path(shutil.copytree(hf, tmp / "model"))
    if how == "no_config":
        (path / "config.json").unlink()
    elif how == "bad_config":
        (path / "config.json").write_text('{"model_type": "llama",')
    elif how == "list_config":
        (path / "config.json").write_text("[]")
    elif how == "no_weights":
        (path / "model.safetensors").unlink()
    elif how == "truncated":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "not_safetensors":
        (path / "model.safetensors").write_bytes(b"<html>404</html>")
    elif how == "missing_shard":
        index = {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    elif how == "no_tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (path / name).unlink()
    elif how == "no_reward_config":
        (path / REWARD_CONFIG_FILE).unlink()
    return path


@pytest.mark.parametrize(
    ("base", "key", "how", "message"),
    [
        ("sft", "model.path", "missing", "model.path: {p} does not exist"),
        ("sft", "model.path", "file", "model.path: {p} is not a directory"),
        ("sft", "model.path", "no_config", "model.path: {p} has no config.json (not a Hugging Face model directory)"),
        ("sft", "model.path", "bad_config", "model.path: {p}/config.json is not valid JSON (Expecting"),
        ("sft", "model.path", "list_config", "model.path: {p}/config.json is not a JSON object"),
        ("sft", "model.path", "no_weights", "model.path: {p} has no weights (no *.safetensors, *.bin, *.pt"),
        ("sft", "model.path", "truncated", "model.path: {p}/model.safetensors is not a readable safetensors file"),
        ("sft", "model.path", "not_safetensors", "model.path: {p}/model.safetensors is not a readable safetensors"),
        ("sft", "model.path", "missing_shard",
         "model.path: {p}/model.safetensors.index.json lists shard model-00002-of-00002.safetensors, which is missing"),
        ("sft", "model.path", "no_tokenizer",
         "model.path: {p} has no tokenizer files (none of tokenizer.json"),
        ("sft", "model.tokenizer", "missing", "model.tokenizer: {p} does not exist"),
        ("sft", "model.tokenizer", "no_tokenizer", "model.tokenizer: {p} has no tokenizer files"),
        ("dpo", "stage.reference", "missing", "stage.reference: {p} does not exist"),
        ("dpo", "stage.reference", "no_weights", "stage.reference: {p} has no weights"),
        ("annotate", "stage.reward_model", "no_tokenizer", "stage.reward_model: {p} has no tokenizer files"),
        ("annotate", "stage.reward_model", "no_reward_config",
         "stage.reward_model: {p} has no reward_config.json (not a reward model export"),
    ],
)
def test_check_paths_messages(configs, hf_dir, tmp_path, base, key, how, message) -> None:
    cfg = copy.deepcopy(configs[base])
    if base != "annotate":
        OmegaConf.update(cfg, "model.path", str(hf_dir))
    broken = _break(hf_dir, tmp_path, how)
    OmegaConf.update(cfg, key, str(broken))
    with pytest.raises(ConfigError) as info:
        check_paths(cfg)
    text = str(info.value)
    assert text.startswith(message.format(p=broken)), text
    assert "\n" not in text


def test_check_paths_accepts_valid_directories(configs, hf_dir) -> None:
    for base, keys in {"sft": ["model.path"], "dpo": ["model.path", "stage.reference"],
                       "annotate": ["stage.reward_model"]}.items():
        cfg = copy.deepcopy(configs[base])
        for key in keys:
            OmegaConf.update(cfg, key, str(hf_dir))
        check_paths(cfg)
    check_paths(configs["recipe"])  # model built from config, embedded tokenizer: nothing to check


def test_check_paths_requires_model_path_and_skips_recipe_stage_paths(configs, hf_dir, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"^model\.path: must be set"):
        check_paths(OmegaConf.create({"model": {"path": "???", "tokenizer": None}}))
    with pytest.raises(ConfigError, match=r"^model\.path: is empty"):
        check_paths(OmegaConf.create({"model": {"path": "", "tokenizer": None}}))
    cfg = copy.deepcopy(configs["recipe"])
    OmegaConf.update(cfg, "model.path", str(hf_dir))
    check_paths(cfg)
    OmegaConf.update(cfg, "model.path", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"^model\.path: .* does not exist"):
        check_paths(cfg)


# --- fuzz: every line ends as a record, a clean DataError, or a counted skip ---------------------------------

VALIDATORS = {"chat": (validate_chat_record, [CHAT]), "preference": (validate_preference_record,
              [PAIR_LISTS, PAIR_STRINGS]), "reward": (validate_reward_record, [REWARD, HELPSTEER2_ROW])}

_TEXT = st.text(st.characters(exclude_categories=()), max_size=12)  # surrogates included
_SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10**300, max_value=10**320)
            | st.floats() | _TEXT | st.sampled_from(["system", "user", "assistant", "", " "]))
JSON_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(_TEXT | st.sampled_from(["role", "content", "messages"]), inner,
                                             max_size=4), max_leaves=12)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from _paths(child, (*prefix, i))


def _mutate(record: dict, edits: list) -> dict:
    """Apply (where, op, value) edits: replace a node, delete it, or add a key/element beside it."""
    record = copy.deepcopy(record)
    for where, op, value in edits:
        paths = [p for p in _paths(record) if p]
        if not paths:
            record[str(value)[:8]] = value
            continue
        path = paths[where % len(paths)]
        parent = record
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        if op == "replace":
            parent[last] = value
        elif op == "delete":
            del parent[last]
        elif isinstance(parent, dict):
            parent[f"extra{where % 3}"] = value
        else:
            parent.insert(last, value)
    return record


EDITS = st.lists(st.tuples(st.integers(0, 1000), st.sampled_from(["replace", "delete", "add"]), JSON_VALUES),
                 min_size=1, max_size=3)


def _dump(value) -> bytes:
    # ensure_ascii writes lone surrogates as \udXXX escapes; allow_nan writes NaN / Infinity literals.
    return json.dumps(value).encode()


def _check_contract(path: Path, lines: list[bytes], validate) -> list[dict]:
    """The records accepted; asserts the outcome under both policies agrees and names the right line."""
    _write(path, lines)
    rows, skipped = read_jsonl_lines(path, validate, "skip")
    content = [i for i, line in enumerate(lines, start=1) if _non_blank(line, i)]
    assert len(rows) + skipped == len(content)
    good = [i for i, _ in rows]
    for _, record in rows:
        validate(record)
    bad = [i for i in content if i not in good]
    try:
        records, n = read_jsonl(path, validate, "error")
    except DataError as e:
        assert bad and str(e).startswith(f"{path}:{bad[0]}: "), str(e)
    else:
        assert not bad and n == 0 and records == [r for _, r in rows]
    return [r for _, r in rows]


def _non_blank(line: bytes, lineno: int) -> bool:
    if lineno == 1:
        line = line.removeprefix(b"\xef\xbb\xbf")
    try:
        return bool(line.decode("utf-8").strip())
    except UnicodeDecodeError:
        return True


# No example database (runs stay independent of earlier ones); a failure prints its example to replay.
FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# One property per input kind, the validator drawn per example: 200 examples share the three validators.
KINDS = st.sampled_from(sorted(VALIDATORS))


@FUZZ
@given(kind=KINDS, lines=st.lists(st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"")), min_size=1,
                                  max_size=4))
def test_fuzz_arbitrary_bytes(fuzz_dir, kind, lines) -> None:
    _check_contract(fuzz_dir / "bytes.jsonl", lines, VALIDATORS[kind][0])


@FUZZ
@given(kind=KINDS, values=st.lists(JSON_VALUES, min_size=1, max_size=3))
def test_fuzz_arbitrary_json(fuzz_dir, kind, values) -> None:
    _check_contract(fuzz_dir / "json.jsonl", [_dump(v) for v in values], VALIDATORS[kind][0])


def _tokenise(tok, kind: str, record: dict) -> None:
    """Accepted records must be usable, not only pass validation: tokenising one must not raise."""
    if kind == "chat":
        tokenize_chat(tok, record["messages"], 64)
    elif kind == "preference":
        tokenize_pair(tok, record, 64)
    else:
        tokenize_reward_example(tok, record, HELPSTEER2_ATTRIBUTES, 64)


@FUZZ
@given(kind=KINDS, data=st.data())
def test_fuzz_near_valid_records(fuzz_dir, tok, kind, data) -> None:
    validate, seeds = VALIDATORS[kind]
    seed = data.draw(st.sampled_from(seeds))
    records = [_mutate(seed, data.draw(EDITS)) for _ in range(data.draw(st.integers(1, 3)))]
    lines = [_dump(r) for r in [seed, *records]]
    for record in _check_contract(fuzz_dir / "near.jsonl", lines, validate):
        _tokenise(tok, kind, record)
