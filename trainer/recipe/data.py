"""A recipe's data: named sources materialised as JSONL, and per-stage weighted mixes with replay.

The largest-weight source of a stage's mix is used whole; every other source contributes
``round(n_primary * w / w_primary)`` records drawn without replacement (with replacement only when the
source is smaller than its share), so ``general: 0.98, code: 0.02`` replays about 2 % code samples.
Everything is a function of the recipe seed: rerunning a recipe rebuilds byte-identical files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from trainer.data.records import read_jsonl
from trainer.data.synthetic import write_jsonl
from trainer.stages.common import SYNTHETIC

# Record-level checks by kind come from the stage that reads the mix; here a record is any JSON object.
_ANY = lambda record: None  # noqa: E731


def source_files(name: str, source: DictConfig, data_dir: Path) -> tuple[list[Path], list[Path]]:
    """The source's train / eval files, writing synthetic ones under ``data_dir/sources`` if needed."""
    if source.train:
        return [Path(p) for p in source.train], [Path(p) for p in source.eval]
    if not source.families and not source.generator:
        raise ValueError(f"recipe.sources.{name}: give train files, synthetic families or a generator")
    out = data_dir / "sources"
    train, eval_ = out / f"{name}_train.jsonl", out / f"{name}_eval.jsonl"
    if not (train.is_file() and eval_.is_file()):
        out.mkdir(parents=True, exist_ok=True)
        generate = _generator(source)
        write_jsonl(train, generate(source.n_train, source.seed))
        # A different seed stream, so held-out prompts are new draws, not the training ones.
        write_jsonl(eval_, generate(source.n_eval, source.seed + 1_000_003))
    return [train], [eval_]


def _generator(source: DictConfig) -> Callable[[int, int], list[dict]]:
    """``(n, seed) -> records`` of a synthetic source: its kind's task-family generator, or LongWriter's."""
    if source.generator == "longwriter":
        from trainer.curation.longwriter_data import generate

        options = OmegaConf.to_container(source.options, resolve=True)
        return lambda n, seed: generate(n, seed, **options)[0]
    return lambda n, seed: SYNTHETIC[source.kind](n, seed, list(source.families))


def _records(files: list[Path]) -> list[dict]:
    return [r for path in files for r in read_jsonl(path, _ANY)[0]]


def mix(parts: list[tuple[str, float, list[dict]]], seed: int) -> tuple[list[dict], dict[str, float]]:
    """Mixed, shuffled records and the realised proportion of each source."""
    rng = random.Random(seed)
    primary_name, primary_weight, primary = max(parts, key=lambda p: p[1])
    chosen: list[tuple[str, dict]] = [(primary_name, r) for r in primary]
    for name, weight, records in parts:
        if name == primary_name:
            continue
        k = round(len(primary) * weight / primary_weight)
        picks = rng.sample(records, k) if k <= len(records) else [rng.choice(records) for _ in range(k)]
        chosen += [(name, r) for r in picks]
    rng.shuffle(chosen)
    counts = {name: 0 for name, _, _ in parts}
    for name, _ in chosen:
        counts[name] += 1
    return [r for _, r in chosen], {name: c / len(chosen) for name, c in counts.items()}


def stage_data(stage_name: str, mix_spec: tuple[tuple[str, float], ...],
               files: Callable[[str], tuple[list[Path], list[Path]]], data_dir: Path,
               seed: int) -> tuple[Path, list[Path], dict[str, float]]:
    """Write the stage's mixed train file; return it, the eval files of its sources, the proportions.
    ``files(source)`` gives a source's (train, eval) files: a recipe source's, or an earlier stage's
    dataset.

    ``data_dir`` is created here: only synthetic sources create it on their way (``source_files``),
    and a recipe whose sources are all JSONL files must not depend on that."""
    parts, evals = [], []
    for name, weight in mix_spec:
        train, eval_ = files(name)
        parts.append((name, weight, _records(train)))
        evals += eval_
    records, proportions = mix(parts, seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / f"{stage_name}_train.jsonl"
    write_jsonl(path, records)
    (data_dir / f"{stage_name}_mix.json").write_text(json.dumps(proportions, indent=2))
    return path, evals, proportions
