"""Every YAML under configs/ composes onto the schema and validates; bad values name their key."""

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from hydra.errors import ConfigCompositionException

from trainer.cli import CONFIG_DIR, torchrun_command
from trainer.config import ConfigError, register_configs, validate
from trainer.recipe import plan

# Options whose file leaves a required (???) key for the user to fill in.
REQUIRED = {"model/hf": ["model.path=/models/any"], "data/jsonl": ["data.train=[/data/train.jsonl]"],
            "stage/annotate": ["stage.reward_model=/runs/x/stages/reward/hf"],
            "recipe/nemotron4_340b": ["model.path=/models/base", "recipe.sources.helpsteer2.train=[/d/hs2.jsonl]",
                                      "recipe.sources.code.train=[/d/code.jsonl]",
                                      "recipe.sources.general.train=[/d/general.jsonl]",
                                      "recipe.sources.pairs.train=[/d/pairs.jsonl]"]}


def _compose(overrides=()):
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _options():
    root = Path(CONFIG_DIR)
    for group in sorted(p for p in root.iterdir() if p.is_dir()):
        for yaml in sorted(group.glob("*.yaml")):
            yield f"{group.name}/{yaml.stem}"


@pytest.mark.parametrize("option", list(_options()))
def test_every_config_option_composes_and_validates(option):
    group, name = option.split("/")
    cfg = _compose([f"{group}={name}", *REQUIRED.get(option, [])])
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    validate(cfg)
    if group == "recipe":
        stages = plan(cfg.recipe)  # the stage graph is valid: every artifact a stage names comes earlier
        assert stages and all(s.name for s in stages)


def test_there_is_an_option_for_every_group():
    groups = {o.split("/")[0] for o in _options()}
    assert {"model", "data", "parallel", "stage", "cluster", "logging"} <= groups


def test_default_is_the_embedded_tiny_model_on_synthetic_data():
    cfg = _compose()
    assert cfg.model.path is None and cfg.data.train == [] and cfg.logging.wandb_mode == "offline"


@pytest.mark.parametrize("overrides, key", [
    (["parallel.zero_stage=5"], "parallel.zero_stage"),
    (["parallel.precision=fp8"], "parallel.precision"),
    (["stage.loss_reduction=mean"], "stage.loss_reduction"),
    (["data.truncation=middle"], "data.truncation"),
    (["parallel.pp=2"], "parallel.pp"),
    (["parallel.offload_optimizer=true"], "parallel.offload_optimizer"),
    (["stage.micro_batch_size=0"], "stage.micro_batch_size"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last"),
    (["stage=dpo", "stage.loss=kto"], "stage.loss"),
    (["stage=rpo", "stage.rpo_distance=js"], "stage.rpo_distance"),
    (["stage=dpo", "stage.beta=0"], "stage.beta"),
    (["stage=dpo", "stage.reference_mode=lazy"], "stage.reference_mode"),
    (["stage=reward", "stage.attribute_weights=[1.0]"], "stage.attribute_weights"),
    (["stage=benchmark", "stage.timed_steps=0"], "stage.timed_steps"),
    (["parallel=megatron_tp2pp2", "stage.packing=true"], "stage.packing"),
    (["parallel=megatron_tp2pp2", "stage=dpo", "stage.prefix_sharing=true"], "stage.prefix_sharing"),
    (["parallel.logits_chunk_tokens=-1"], "parallel.logits_chunk_tokens"),
    (["parallel=megatron_tp2pp2", "parallel.cp=2"], "parallel.cp"),
    (["parallel=megatron_tp2pp2", "stage.neftune_alpha=5"], "stage.neftune_alpha"),
])
def test_invalid_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match="^" + re.escape(key) + ":"):
        validate(_compose(overrides))


def test_layout_must_tile_the_world():
    cfg = _compose(["parallel.tp=2", "parallel.dp=3"])
    with pytest.raises(ConfigError, match=r"parallel\.dp: .* must equal the world size 4"):
        validate(cfg, world_size=4)
    with pytest.raises(ConfigError, match=r"does not divide the world size 3"):
        validate(_compose(["parallel.tp=2"]), world_size=3)
    with pytest.raises(ConfigError, match=r"stage\.global_batch_size: 10 must be a multiple"):
        validate(_compose(["stage.global_batch_size=10", "stage.micro_batch_size=4"]), world_size=2)
    validate(_compose(["parallel.tp=2", "stage.micro_batch_size=2"]), world_size=4)


def test_schema_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(ConfigCompositionException, match="stage.learning_rate"):
        _compose(["stage.learning_rate=1"])
    with pytest.raises(ConfigError, match=r"^stage\.learning_rate: not a config key"):
        validate(_compose(["+stage.learning_rate=1"]))
    with pytest.raises(ConfigCompositionException, match="stage.epochs=many"):
        _compose(["stage.epochs=many"])


def test_launcher_reexecutes_with_the_same_overrides():
    cfg = _compose(["cluster=local2", "parallel=zero2"])
    cmd = torchrun_command(cfg, ["cluster=local2", "parallel=zero2"])
    assert "--nproc_per_node=2" in cmd and cmd[-3:] == ["cluster=local2", "parallel=zero2", "hydra.output_subdir=null"]


def test_stage_types_carry_their_own_schema():
    dpo = _compose(["stage=dpo"])
    assert dpo.stage.type == "preference" and dpo.stage.loss == "dpo" and dpo.stage.reference_mode == "cached"
    with pytest.raises(ConfigCompositionException, match="stage.beta"):
        _compose(["stage=sft", "stage.beta=0.1"])  # an SFT stage has no beta
    with pytest.raises(ConfigError, match=r"^stage\.reward_model:"):
        validate(_compose(["stage=annotate", "stage.reward_model=''"]))


def test_recipe_stage_graph_rejects_a_later_reference():
    cfg = _compose(["recipe=demo", "recipe.stages.2.reference=rpo_1"])  # dpo referencing a later stage
    with pytest.raises(ConfigError, match=r"recipe\.stages\[2\]\.reference: 'rpo_1' is neither"):
        plan(cfg.recipe)


def test_recipe_repeat_chains_iterations():
    stages = [s for s in plan(_compose(["recipe=demo"]).recipe) if s.type != "annotate"]
    assert [s.name for s in stages] == ["code_sft", "general_sft", "dpo", "rm", "rpo_1", "rpo_2", "rpo_3"]
    assert [(s.init, s.reference) for s in stages[4:]] == [("dpo", "dpo"), ("rpo_1", "rpo_1"), ("rpo_2", "rpo_2")]
    assert stages[0].init == "base" and stages[1].data == (("general", 0.98), ("code", 0.02))


def test_recipe_data_must_match_the_stage_kind():
    cfg = _compose(["recipe=demo", "recipe.stages.2.data=[{source: code, weight: 1.0}]"])
    with pytest.raises(ConfigError, match=r"recipe\.stages\[2\]\.data: a preference stage needs preference"):
        plan(cfg.recipe)
