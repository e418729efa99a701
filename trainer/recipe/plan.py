"""A recipe's stage list, expanded, wired by artifact and checked before anything runs.

Each stage type produces one artifact (trainer/stages/registry.py): a ``policy`` (sft, preference), a
``reward_model`` (reward) or a ``dataset`` (annotate). A recipe stage consumes artifacts by name:
- ``init`` / ``reference``: ``previous`` (the newest policy before this stage), ``base`` (the
  recipe's model), an earlier policy-producing stage, or a path. A reward stage's ``init`` is the
  backbone it starts from, also a policy.
- ``reward_model``: an earlier reward stage (or a path). On an annotate stage it is the model that
  scores; on a preference stage it makes every iteration score its own training pairs first: the plan
  inserts ``<name>_annotate`` (an annotate stage over the same data, its rewards replacing any the pairs
  carried) and the preference stage trains on that stage's dataset.
- ``data: [{source: S}]``: S is a recipe source or an earlier dataset-producing stage (annotate, or
  curate: a curation tool's kept records, in the format of its input).

``repeat: 3`` becomes three stages ``<name>_1.._3``; iteration k starts from, and (for preference
stages) uses as reference, iteration k-1's policy. Every reference to an artifact that comes later,
does not exist or has the wrong kind is an error naming the recipe key; :func:`check_recipe` also
validates every stage's full config against the world size, before the first stage starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from trainer.config import CONFIG_DIR, ConfigError
from trainer.stages.registry import DATASET, POLICY, REWARD_MODEL, stage_type


@dataclass(frozen=True)
class PlannedStage:
    name: str
    type: str
    config: DictConfig  # the full stage config (its type's schema), name set
    init: str  # "base", or the name of an earlier planned stage, or a path
    reference: str | None  # same, for preference stages
    reward_model: str | None  # annotate: the reward stage (or path) that scores
    data: tuple[tuple[str, float], ...]  # (recipe source or dataset stage, weight)
    iteration: int  # 1-based within a repeated stage
    key: str  # the recipe key it came from, for error messages
    data_kind: str | None = None  # the record format of its data (and of the dataset it produces)
    gguf: tuple[str, ...] = ()  # GGUF types written from its export when it completes

    @property
    def produces(self) -> str | None:
        return stage_type(self.type).produces


def load_stage_config(name: str, overrides: dict, key: str) -> DictConfig:
    """configs/stage/<name>.yaml on its type's schema, with ``overrides`` merged in. A stage file may
    start from another one (``defaults: [reward]``), as the named presets do."""
    path = Path(CONFIG_DIR) / "stage" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"{key}.stage: no stage config {path}")
    raw = OmegaConf.load(path)
    parents = [d for d in raw.pop("defaults", []) if isinstance(d, str) and not d.endswith("_schema")
               and d != "_self_"]
    base = OmegaConf.create()
    for parent in parents:
        base = OmegaConf.merge(base, load_stage_config(parent, {}, key))
    raw = OmegaConf.merge(base, raw)
    kind = stage_type(raw.get("type", "sft"), f"{key}.stage ({path})")
    try:
        return OmegaConf.merge(OmegaConf.structured(kind.schema), raw, overrides)
    except Exception as err:  # OmegaConf names the offending key in its message
        raise ConfigError(f"{key}.overrides: {err}") from None


class _Artifacts:
    """What the stages planned so far produce, to resolve names against."""

    def __init__(self):
        self.stages: list[PlannedStage] = []

    def names(self, kind: str) -> list[str]:
        return [s.name for s in self.stages if s.produces == kind]

    def newest_policy(self) -> str:
        policies = self.names(POLICY)
        return policies[-1] if policies else "base"

    def resolve(self, choice: str, kind: str, key: str) -> str:
        if kind == POLICY and choice == "previous":
            return self.newest_policy()
        if (kind == POLICY and choice == "base") or choice in self.names(kind):
            return choice
        if choice in (s.name for s in self.stages):
            other = next(s for s in self.stages if s.name == choice)
            raise ConfigError(f"{key}: stage {choice!r} produces a {other.produces}, not a {kind}")
        if "/" in choice or Path(choice).exists():
            return choice  # a path to an HF directory
        options = (["previous", "base"] if kind == POLICY else []) + self.names(kind)
        raise ConfigError(f"{key}: {choice!r} is neither a path nor a {kind} of a stage before this one "
                          f"(choices: {', '.join(options) or 'none'})")


def _data_kind(recipe: DictConfig, artifacts: _Artifacts, source: str, key: str) -> str:
    if source in recipe.sources:
        return recipe.sources[source].kind
    if source in artifacts.names(DATASET):
        return next(s for s in artifacts.stages if s.name == source).data_kind
    raise ConfigError(f"{key}.data: unknown source {source!r}; recipe.sources has "
                      f"{', '.join(recipe.sources) or 'none'}, earlier dataset stages "
                      f"{', '.join(artifacts.names(DATASET)) or 'none'}")


def _check_data(recipe: DictConfig, artifacts: _Artifacts, spec: DictConfig, wanted: str | None, key: str,
                kind_name: str) -> str:
    """The one record format of the stage's sources (``wanted`` when the stage type fixes it)."""
    if not spec.data:
        raise ConfigError(f"{key}.data: name at least one source")
    if any(m.weight <= 0 for m in spec.data):
        raise ConfigError(f"{key}.data: weights must be > 0")
    kinds = {_data_kind(recipe, artifacts, m.source, key) for m in spec.data}
    if wanted is not None and kinds != {wanted}:
        raise ConfigError(f"{key}.data: a {kind_name} stage needs {wanted} sources; got {', '.join(sorted(kinds))}")
    if len(kinds) != 1:
        raise ConfigError(f"{key}.data: sources of one record format, please; got {', '.join(sorted(kinds))}")
    return kinds.pop()


def _missing_rewards(path: Path) -> tuple[int, int]:
    """(pairs without both rewards, pairs) of a preference JSONL file; unreadable lines are left to the
    stage's own loader, which names them."""
    missing = total = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                total += 1
                missing += record.get("chosen_reward") is None or record.get("rejected_reward") is None
    return missing, total


def _check_rewards(recipe: DictConfig, st: PlannedStage) -> None:
    """RPO trains on rewards: every training pair must carry them, from the files themselves, the
    synthetic generator (the verifier's), or an earlier annotate stage."""
    if st.type != "preference" or st.config.loss != "rpo":
        return
    for source, _ in st.data:
        if source not in recipe.sources:
            continue  # an annotate stage's dataset: scored by construction
        spec = recipe.sources[source]
        for path in map(Path, spec.train):
            if not path.is_file():
                raise ConfigError(f"recipe.sources.{source}.train: no such file {path}")
            missing, total = _missing_rewards(path)
            if missing:
                raise ConfigError(
                    f"{st.key}: stage {st.name} (loss rpo) needs chosen_reward / rejected_reward on every "
                    f"training pair; {missing} of {total} pairs in {path} have none. Give the stage "
                    "reward_model: <a reward stage> to score them first, or train on an annotate stage's output")


def plan(recipe: DictConfig) -> list[PlannedStage]:
    if not recipe.stages:
        raise ConfigError("recipe.stages: a recipe needs at least one stage")
    artifacts = _Artifacts()
    for i, spec in enumerate(recipe.stages):
        key = f"recipe.stages[{i}]"
        if spec.repeat < 1:
            raise ConfigError(f"{key}.repeat: must be >= 1; got {spec.repeat}")
        overrides = OmegaConf.to_container(spec.overrides, resolve=True)
        for k in range(1, spec.repeat + 1):
            name = spec.name if spec.repeat == 1 else f"{spec.name}_{k}"
            config = load_stage_config(spec.stage, overrides, key)
            kind = stage_type(config.type)
            data_kind = _check_data(recipe, artifacts, spec, kind.consumes, key, config.type)
            data = tuple((m.source, float(m.weight)) for m in spec.data)
            reward_model = None
            if spec.reward_model is not None:
                if config.type not in ("annotate", "preference", "curate"):
                    raise ConfigError(f"{key}.reward_model: only annotate, preference and curate stages use a reward "
                                      f"model; {spec.stage} is a {config.type} stage")
                reward_model = artifacts.resolve(spec.reward_model, REWARD_MODEL, f"{key}.reward_model")
            elif config.type == "annotate":
                raise ConfigError(f"{key}.reward_model: an annotate stage needs the reward stage that scores "
                                  f"(choices: {', '.join(artifacts.names(REWARD_MODEL)) or 'none yet'})")
            if config.type == "preference" and reward_model is not None:
                # Score this iteration's pairs with the reward model, then train on the scored pairs.
                scoring = load_stage_config("annotate", {"overwrite_rewards": True,
                                                         "micro_batch_size": config.micro_batch_size}, key)
                scoring.name = f"{name}_annotate"
                _add(artifacts, PlannedStage(name=scoring.name, type="annotate", config=scoring, init="base",
                                             reference=None, reward_model=reward_model, data=data,
                                             iteration=k, key=key, data_kind=data_kind))
                data, reward_model = ((scoring.name, 1.0),), None
            config.name = name
            init = artifacts.resolve(spec.init if k == 1 else "previous", POLICY, f"{key}.init")
            reference = None
            if config.type == "preference":
                reference = artifacts.resolve(spec.reference if k == 1 else "previous", POLICY, f"{key}.reference")
            st = PlannedStage(name=name, type=config.type, config=config, init=init, reference=reference,
                              reward_model=reward_model, data=data, iteration=k, key=key, data_kind=data_kind,
                              gguf=_gguf_types(spec, kind.produces, key))
            _check_rewards(recipe, st)
            _add(artifacts, st)
    return artifacts.stages


def _gguf_types(spec, produces: str | None, key: str) -> tuple[str, ...]:
    from trainer.export.gguf import OUTTYPES

    types = tuple(spec.gguf)
    if types and produces != POLICY:
        raise ConfigError(f"{key}.gguf: only a stage that produces a policy model can be written as GGUF; "
                          f"{spec.stage} produces {produces or 'nothing'}")
    for t in types:
        if t not in OUTTYPES:
            raise ConfigError(f"{key}.gguf: {t!r} is not one of {', '.join(OUTTYPES)}")
    if "q4_k_m" in types:
        from trainer.runtime.errors import BadInput
        from trainer.export.quantize import require_quantizer

        try:
            require_quantizer()
        except BadInput as e:  # refused at planning, not after the stage trained
            raise ConfigError(f"{key}.gguf: q4_k_m: {e}") from None
    return types


def _add(artifacts: _Artifacts, st: PlannedStage) -> None:
    if st.name in (s.name for s in artifacts.stages) or st.name == "base":
        raise ConfigError(f"{st.key}.name: stage name {st.name!r} is used twice")
    artifacts.stages.append(st)


def stage_config(cfg: DictConfig, st: PlannedStage, exports: dict[str, Path], train: list[Path], evals: list[Path],
                 mix: list[dict] | None = None) -> DictConfig:
    """The root config as the stage loop expects it: this stage's config, model, reward model, data
    (``train`` files, or the ``mix`` of sources the stage draws by index, trainer/data/mixing.py)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("recipe")
    stage_cfg = OmegaConf.create(plain)
    stage_cfg.stage = st.config
    path = lambda choice: str(exports.get(choice, choice))  # noqa: E731  (a stage name, base, or a path)
    stage_cfg.model.path = path(st.init)
    stage_cfg.model.tokenizer = None
    if st.reference is not None:
        stage_cfg.stage.reference = path(st.reference)
    if st.reward_model is not None:
        stage_cfg.stage.reward_model = path(st.reward_model)
    stage_cfg.data.train = [str(p) for p in train]
    stage_cfg.data.mix = mix or []
    stage_cfg.data.mix_seed = cfg.run.seed + st.iteration
    stage_cfg.data.eval = [str(p) for p in evals]
    return stage_cfg


def check_recipe(cfg: DictConfig, world_size: int | None) -> list[PlannedStage]:
    """Plan the recipe and validate every stage's own config (as the runner will build it) against
    ``world_size``: a bad batch split in the last stage fails here, not hours into the run."""
    from trainer.config.validate import validate

    stages = plan(cfg.recipe)
    for name, source in cfg.recipe.sources.items():
        if source.generator not in (None, "longwriter"):
            raise ConfigError(f"recipe.sources.{name}.generator: must be longwriter or null; got {source.generator!r}")
        if source.generator and source.kind != "sft":
            raise ConfigError(f"recipe.sources.{name}.kind: the longwriter generator writes chat (sft) records")
    unknown = set(cfg.recipe.eval.length_following) - set(cfg.recipe.eval.sources)
    if unknown:
        raise ConfigError(f"recipe.eval.length_following: {', '.join(sorted(unknown))} not in recipe.eval.sources")
    placeholder = {st.name: Path(cfg.run.dir) / "stages" / st.name / "hf" for st in stages}
    for st in stages:
        try:
            validate(stage_config(cfg, st, {"base": Path(cfg.run.dir), **placeholder}, [Path("train.jsonl")], []),
                     world_size)
        except ConfigError as err:
            raise ConfigError(f"{st.key} (stage {st.name}): {err}") from None
    return stages
