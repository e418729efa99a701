"""Start-up checks of the model and tokenizer directories a config names, before anything heavy starts.

Why: transformers reports a bad path late and obliquely. A missing directory becomes
`HFValidationError: Repo id must be in the form ...` (the path is taken for a hub name), a directory of
unrelated files becomes "You need to have sentencepiece or tiktoken installed", and a truncated
safetensors shard fails only once the weights load, after workers have started. These checks read
only directory listings, small JSON files and safetensors headers (a few KB each), and every error is
one line that starts with the dotted key, names the path and says what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open

from trainer.config.validate import ConfigError

# What a reward export holds besides the backbone (trainer.models.reward writes it). Defined here, not
# there: that module pulls in torch and transformers, seconds the launcher should not spend first.
REWARD_CONFIG_FILE = "reward_config.json"

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.index.json")
# Any one of these lets AutoTokenizer find a tokenizer (tokenizer_config.json may name the class).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model")


def check_paths(cfg: DictConfig) -> None:
    """Raise ConfigError for the first model or tokenizer path of `cfg` that cannot be loaded.

    Checked: `model.path` (a Hugging Face model directory), the tokenizer source (`model.tokenizer`, or
    `model.path` when that is null), and when the stage has them, `stage.reference` (a model directory)
    and `stage.reward_model` (a reward export: model, tokenizer and reward config). In recipe mode
    (`cfg.recipe` set) only `model.*` is checked: stage-level paths there may be produced by earlier
    stages, and the recipe runner sets them itself.
    """
    model_path = _path(cfg, "model", "path")
    tokenizer_path = _path(cfg, "model", "tokenizer")
    if model_path is not None:
        check_model_dir("model.path", model_path)
    if tokenizer_path is not None:
        check_tokenizer_dir("model.tokenizer", tokenizer_path)
    elif model_path is not None:
        check_tokenizer_dir("model.path", model_path, hint="; set model.tokenizer to a tokenizer directory")
    if cfg.get("recipe") is not None:
        _check_sources(cfg.recipe)
        return
    reference = _path(cfg, "stage", "reference")
    if reference is not None:
        check_model_dir("stage.reference", reference)
    reward_model = _path(cfg, "stage", "reward_model")
    if reward_model is not None:
        check_model_dir("stage.reward_model", reward_model)
        check_tokenizer_dir("stage.reward_model", reward_model)
        if not (reward_model / REWARD_CONFIG_FILE).is_file():
            raise ConfigError(f"stage.reward_model: {reward_model} has no {REWARD_CONFIG_FILE} "
                              "(not a reward model export; a reward stage writes one into its hf/)")


def _path(cfg: DictConfig, section: str, name: str) -> Path | None:
    """The path under `section.name`, None when null or absent from this stage's schema."""
    node = cfg.get(section)
    if node is None:
        return None
    # Checked first: `in` is False for a ??? value, which would read as "not in this schema".
    if OmegaConf.is_missing(node, name):
        raise ConfigError(f"{section}.{name}: must be set (it is ???)")
    if name not in node or node[name] is None:
        return None
    value = str(node[name])
    if not value:
        if name == "tokenizer":  # "" falls back to model.path, as trainer.stages.common.build_tokenizer reads it
            return None
        raise ConfigError(f"{section}.{name}: is empty; set a directory or null")
    return Path(value)


def check_model_dir(key: str, path: Path) -> None:
    """A loadable Hugging Face model directory: config.json as a JSON object, and readable weights."""
    _check_dir(key, path)
    config = path / "config.json"
    if not config.is_file():
        raise ConfigError(f"{key}: {path} has no config.json (not a Hugging Face model directory)")
    if not isinstance(_read_json(key, config), dict):
        raise ConfigError(f"{key}: {config} is not a JSON object")
    weights = sorted({file for pattern in WEIGHT_PATTERNS for file in path.glob(pattern) if file.is_file()})
    if not weights:
        raise ConfigError(f"{key}: {path} has no weights (no {', '.join(WEIGHT_PATTERNS)})")
    for file in weights:
        if file.name.endswith(".index.json"):
            _check_index(key, file)
        elif file.suffix == ".safetensors":
            _check_safetensors(key, file)


def check_tokenizer_dir(key: str, path: Path, hint: str = "") -> None:
    """A directory holding at least one file a Hugging Face tokenizer is loaded from."""
    _check_dir(key, path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES) and not any(path.glob("*.tiktoken")):
        raise ConfigError(f"{key}: {path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}, "
                          f"*.tiktoken){hint}")


def _check_dir(key: str, path: Path) -> None:
    if not path.exists():
        raise ConfigError(f"{key}: {path} does not exist")
    if not path.is_dir():
        raise ConfigError(f"{key}: {path} is not a directory")


def _read_json(key: str, file: Path) -> object:
    try:
        return json.loads(file.read_bytes())
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {file} ({e.strerror})") from None
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8/16/32
        raise ConfigError(f"{key}: {file} is not valid JSON ({e})") from None


def _check_index(key: str, index: Path) -> None:
    """A sharded checkpoint's index: every shard it maps a tensor to must be present.

    Why: a partly copied checkpoint otherwise fails only when transformers reaches the missing shard.
    """
    content = _read_json(key, index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict):
        raise ConfigError(f"{key}: {index} has no 'weight_map' object (not a checkpoint index)")
    for shard in sorted({str(name) for name in weight_map.values()}):
        if not (index.parent / shard).is_file():
            raise ConfigError(f"{key}: {index} lists shard {shard}, which is missing from {index.parent}")


def _check_safetensors(key: str, file: Path) -> None:
    """Read the header only (memory-mapped, no tensor data): catches truncated and non-safetensors files."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.metadata()
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{key}: {file} is not a readable safetensors file ({e})") from None


def _check_sources(recipe: DictConfig) -> None:
    """Every recipe source a stage or the eval reads has data: files that exist, or synthetic task families. (The shipped recipes
    write ``train: ???`` for the user's files; merged onto the schema's empty list it reads as none.)"""
    used = {d.source for st in recipe.stages for d in st.data} | set(recipe.eval.sources if recipe.eval.enabled else ())
    for name, source in recipe.sources.items():
        if name not in used:
            continue
        if not source.train and not source.families and not source.generator:
            raise ConfigError(f"recipe.sources.{name}.train: source {name} has no data; give its files "
                              f"(recipe.sources.{name}.train=[/path/train.jsonl]), synthetic task families or a generator")
        for split in ("train", "eval"):
            for path in source[split]:
                if not Path(path).exists():
                    raise ConfigError(f"recipe.sources.{name}.{split}: no such file or directory: {path}")
