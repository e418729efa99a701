"""A recipe's data: named sources (synthetic ones written as JSONL once), and per-stage weighted
mixes with replay.

The largest-weight source of a stage's mix is used whole; every other source contributes
``round(n_primary * w / w_primary)`` examples (trainer/data/mixing.py), so ``general: 0.98, code: 0.02``
replays about 2 % code samples. A training stage draws its mix by index over each source's tokenised
cache (``data.mix``); only a stage that produces a dataset gets the mix written as JSONL. Everything is a
function of the recipe seed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from trainer.data.mixing import mix_counts, mix_index, proportions
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
    """Mixed, shuffled records and the realised proportion of each source (the rule of
    trainer/data/mixing.py, which training stages apply by index without writing anything)."""
    sizes = [len(records) for _, _, records in parts]
    pairs = mix_index(sizes, mix_counts(sizes, [weight for _, weight, _ in parts]), seed)
    return [parts[s][2][i] for s, i in pairs], proportions(pairs, [name for name, _, _ in parts])


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


def stage_train(st, files: Callable[[str], tuple[list[Path], list[Path]]], data_dir: Path, topology,
                seed: int) -> tuple[list[Path], list[dict]]:
    """What a stage trains on, as ``(data.train, data.mix)``: one source's files as they are; several
    sources as a ``data.mix`` the stage draws by index (trainer/data/mixing.py), nothing written. A
    stage that produces a dataset (annotate, curate) reads records, not tokenised examples, so for it
    rank 0 writes the mix as JSONL (``stage_data``) and the other ranks wait."""
    from trainer.stages.registry import DATASET

    if len(st.data) == 1:
        return files(st.data[0][0])[0], []
    if st.produces != DATASET:
        return [], [{"train": [str(p) for p in files(name)[0]], "weight": weight, "max_samples": -1}
                    for name, weight in st.data]
    if topology.is_main:
        stage_data(st.name, st.data, files, data_dir, seed)
    topology.barrier()
    return [data_dir / f"{st.name}_train.jsonl"], []


def realised_mix(st, result: dict, data_dir: Path) -> dict[str, float]:
    """The share of each source in what the stage trained on, by source name."""
    if len(st.data) == 1:
        return {st.data[0][0]: 1.0}
    shares = result.get("train_data", {}).get("mix")
    if shares:  # keyed data.mix[i] (file), in the order of st.data
        return {name: share for (name, _), share in zip(st.data, shares.values())}
    return json.loads((data_dir / f"{st.name}_mix.json").read_text())
