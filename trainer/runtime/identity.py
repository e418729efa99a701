"""What makes a stage's result what it is, so a rerun reuses it only when nothing that matters changed.

A stage's identity is its resolved config minus the keys that cannot change its results (where logs go,
how often it checkpoints, how the world is split: layouts are proven to train the same losses), plus
fingerprints of what the config only names: the content hash of every data file and of the models it
starts from. ``<stage>/identity.json`` records it when the stage first starts; a rerun whose identity
differs is refused with the keys that changed, unless ``checkpoint.on_change`` says to start the stage
over (the old directory is kept, renamed) or to resume anyway.

The same rule names the default run.dir, ``runs/<run.name>-<run_id>``: ``run_id`` hashes the
result-relevant config, so two different jobs never share a directory while the same command always
finds its own again.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
IDENTITY = "identity.json"

# Keys that cannot change what a stage computes (dotted prefixes): the layout and the micro-batch
# split are proven to train the same losses (tests/test_sft_stage.py), and a checkpoint resumes in
# another data-parallel size. parallel.strategy and parallel.precision stay in: they change the
# numbers or the checkpoint format.
VOLATILE = ("hydra", "run.name", "run.dir", "run.stop_signals", "logging", "cluster", "checkpoint",
            "data.cache_dir", "stage.eval_every", "stage.max_bad_steps", "stage.micro_batch_size", "parallel.tp", "parallel.pp",
            "parallel.cp", "parallel.dp", "parallel.virtual_pp", "parallel.sequence_parallel",
            "parallel.distributed_optimizer", "parallel.zero_stage", "parallel.offload_optimizer",
            "parallel.activation_checkpointing", "parallel.device", "parallel.backend",
            "parallel.timeout_minutes", "recipe.claims")
# Config keys that name a model directory; their fingerprint joins the identity.
MODEL_KEYS = ("model.path", "model.tokenizer", "stage.reference", "stage.reward_model")


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _relevant(flat: dict) -> dict:
    return {k: v for k, v in sorted(flat.items())
            if not any(k == p or k.startswith(p + ".") for p in VOLATILE)}


def config_items(cfg: DictConfig) -> dict:
    """The result-relevant keys of ``cfg``, flattened to ``{dotted key: value}``."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    for key in ("hydra",):
        plain.pop(key, None)
    run = plain.get("run", {})
    run.pop("dir", None)  # the resolver below is called while run.dir resolves: never resolve it
    resolved = OmegaConf.to_container(OmegaConf.create(plain), resolve=True)
    return _relevant(_flatten(resolved))


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def run_id(*, _root_: DictConfig) -> str:
    """OmegaConf resolver ``${run_id:}``: 8 hex digits of the run's result-relevant config."""
    return digest(config_items(_root_))[:8]


def file_hash(path: Path, _memo: dict = {}) -> str:  # noqa: B006 - per-process memo keyed by (path, size, mtime)
    """sha256 of a file's bytes; remembered per (path, size, mtime) within a process, so the stage
    identity, the tokenised cache key and the reference cache key read each data file once."""
    st = path.stat()
    memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo_key not in _memo:
        with open(path, "rb") as f:
            _memo[memo_key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _memo[memo_key]


def model_fingerprint(path: Path) -> str:
    """A model directory: its config.json bytes, and every file's name, size and modification time
    (weights are not read: a 340B model's shards are too big to hash on every start; an export that is
    rewritten gets new times)."""
    path = Path(path)
    if not path.is_dir():
        return f"missing:{path}"
    files = sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in path.rglob("*") if p.is_file())
    config = (path / "config.json").read_bytes() if (path / "config.json").is_file() else b""
    return digest([hashlib.sha256(config).hexdigest(), files])[:16]


def stage_identity(cfg: DictConfig) -> dict:
    """``{dotted key: value}``: the stage's relevant config, plus ``<key>#content`` fingerprints of the
    model directories and data files it names."""
    items = config_items(cfg)
    for key in MODEL_KEYS:
        value = OmegaConf.select(cfg, key)
        if value:
            items[f"{key}#content"] = model_fingerprint(Path(value))
    named = {f"data.{split}[{i}]": p for split in ("train", "eval") for i, p in enumerate(cfg.data[split])}
    for k, source in enumerate(cfg.data.get("mix") or []):
        named.update({f"data.mix[{k}].train[{i}]": p for i, p in enumerate(source.train)})
    for key, path in named.items():
        items[f"{key}#content"] = data_fingerprint(Path(path))
    return items


def data_fingerprint(path: Path) -> str:
    """The content hash of a data path: a file's bytes, or every file of a datasets directory."""
    if path.is_file():
        return file_hash(path)
    if path.is_dir() and (path / "state.json").is_file():
        from trainer.data.sources import data_files_of

        return digest([file_hash(f) for f in data_files_of(path)])
    return f"missing:{path}"


def changed_keys(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every key whose value differs (or exists on one side only)."""
    keys = sorted(set(old) | set(new))
    missing = "(unset)"
    return [f"{k}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}" for k in keys if old.get(k) != new.get(k)]


def check_stage(cfg: DictConfig, stage_dir: Path) -> str | None:
    """Rank 0, at the start of a stage: compare with the recorded identity and act on
    ``checkpoint.on_change``. Returns the refusal message, or None to go on (identity recorded)."""
    from trainer.checkpoint import write_text_atomic

    stage_dir = Path(stage_dir)
    new = stage_identity(cfg)
    recorded = stage_dir / IDENTITY
    if recorded.is_file():
        old = json.loads(recorded.read_text())
        changes = changed_keys(old, new)
        if changes:
            policy = cfg.checkpoint.on_change
            shown = "\n  ".join(changes[:20]) + (f"\n  ... and {len(changes) - 20} more" if len(changes) > 20 else "")
            if policy == "refuse":
                return (f"stage {cfg.stage.name}: {stage_dir} holds a run made with a different config:\n  {shown}\n"
                        "Use a new run.dir (the default run.dir is per config), or checkpoint.on_change=restart "
                        "to start this stage over (the old directory is kept), or checkpoint.on_change=resume "
                        "to continue from its checkpoints anyway")
            if policy == "restart":
                stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
                aside = stage_dir.with_name(f"{stage_dir.name}.replaced-{stamp}")
                stage_dir.rename(aside)
                log.warning("stage %s: config changed (%s); the old stage directory is now %s",
                            cfg.stage.name, "; ".join(changes[:5]), aside)
            else:
                log.warning("stage %s: config changed, resuming anyway (checkpoint.on_change=resume):\n  %s",
                            cfg.stage.name, shown)
    elif (stage_dir / "checkpoints").is_dir() or (stage_dir / "COMPLETE.json").is_file():
        log.warning("stage %s: %s predates identity records; assuming it was made with this config",
                    cfg.stage.name, stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(recorded, json.dumps(new, indent=1, sort_keys=True, default=str))
    return None
