"""A recipe's stage list, expanded and checked before anything runs.

``repeat: 3`` becomes three stages ``<name>_1.._3``; iteration k starts from, and (for preference
stages) uses as reference, iteration k-1's policy. ``init`` / ``reference`` name `previous`, `base`,
an earlier stage, or a path; naming a stage that comes later (or not at all) is an error that names
the recipe key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from trainer.config import CONFIG_DIR, STAGE_SCHEMAS, ConfigError


@dataclass(frozen=True)
class PlannedStage:
    name: str
    type: str
    config: DictConfig  # the full stage config (its type's schema), name set
    init: str  # "base", or the name of an earlier planned stage, or a path
    reference: str | None  # same, for preference stages
    data: tuple[tuple[str, float], ...]
    iteration: int  # 1-based within a repeated stage


def load_stage_config(name: str, overrides: dict, key: str) -> DictConfig:
    """configs/stage/<name>.yaml on its type's schema, with ``overrides`` merged in."""
    path = Path(CONFIG_DIR) / "stage" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"{key}.stage: no stage config {path}")
    raw = OmegaConf.load(path)
    raw.pop("defaults", None)
    kind = raw.get("type", "sft")
    if kind not in STAGE_SCHEMAS:
        raise ConfigError(f"{key}.stage: {path} has unknown type {kind!r}")
    try:
        return OmegaConf.merge(OmegaConf.structured(STAGE_SCHEMAS[kind]), raw, overrides)
    except Exception as err:  # OmegaConf names the offending key in its message
        raise ConfigError(f"{key}.overrides: {err}") from None


def _resolve(choice: str, previous: str | None, earlier: list[str], key: str) -> str:
    if choice == "previous":
        return previous or "base"
    if choice == "base" or choice in earlier:
        return choice
    if "/" in choice or Path(choice).exists():
        return choice  # a path to an HF directory
    raise ConfigError(f"{key}: {choice!r} is neither previous, base, a path, nor a stage before this one "
                      f"(earlier stages: {', '.join(earlier) or 'none'})")


def plan(recipe: DictConfig) -> list[PlannedStage]:
    if not recipe.stages:
        raise ConfigError("recipe.stages: a recipe needs at least one stage")
    planned: list[PlannedStage] = []
    for i, spec in enumerate(recipe.stages):
        key = f"recipe.stages[{i}]"
        if spec.repeat < 1:
            raise ConfigError(f"{key}.repeat: must be >= 1; got {spec.repeat}")
        for source, _ in ((m.source, m.weight) for m in spec.data):
            if source not in recipe.sources:
                raise ConfigError(f"{key}.data: unknown source {source!r}; recipe.sources has "
                                  f"{', '.join(recipe.sources) or 'none'}")
        if not spec.data:
            raise ConfigError(f"{key}.data: name at least one source")
        if any(m.weight <= 0 for m in spec.data):
            raise ConfigError(f"{key}.data: weights must be > 0")
        overrides = OmegaConf.to_container(spec.overrides, resolve=True)
        for k in range(1, spec.repeat + 1):
            name = spec.name if spec.repeat == 1 else f"{spec.name}_{k}"
            earlier = [p.name for p in planned]
            if name in earlier:
                raise ConfigError(f"{key}.name: stage name {name!r} is used twice")
            config = load_stage_config(spec.stage, overrides, key)
            config.name = name
            previous = earlier[-1] if earlier else None
            init = _resolve(spec.init if k == 1 else "previous", previous, earlier, f"{key}.init")
            reference = None
            if config.type == "preference":
                reference = _resolve(spec.reference if k == 1 else "previous", previous, earlier,
                                     f"{key}.reference")
            kinds = {recipe.sources[m.source].kind for m in spec.data}
            wanted = {"sft": "sft", "preference": "preference", "reward": "reward", "annotate": "preference"}
            if kinds != {wanted[config.type]}:
                raise ConfigError(f"{key}.data: a {config.type} stage needs {wanted[config.type]} sources; "
                                  f"got {', '.join(sorted(kinds))}")
            planned.append(PlannedStage(name=name, type=config.type, config=config, init=init,
                                        reference=reference, iteration=k,
                                        data=tuple((m.source, float(m.weight)) for m in spec.data)))
    return planned
