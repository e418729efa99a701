"""Recipes v2 planning: artifacts wired by name and kind, every stage validated before the first runs."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_stagecraft
from tests.test_config import _compose
from trainer.config import ConfigError, validate
from trainer.recipe.plan import check_recipe


def _stages(overrides=()):
    cfg = _compose(["recipe=demo", *overrides])
    cfg.run.dir = "/tmp/unused"
    return check_recipe(cfg, 2)


def test_demo_chains_reward_model_annotate_and_rpo():
    stages = _stages()
    assert [(s.name, s.type) for s in stages] == [
        ("code_sft", "sft"), ("general_sft", "sft"), ("dpo", "preference"), ("rm", "reward"),
        ("rpo_1_annotate", "annotate"), ("rpo_1", "preference"), ("rpo_2_annotate", "annotate"),
        ("rpo_2", "preference"), ("rpo_3_annotate", "annotate"), ("rpo_3", "preference")]
    by_name = {s.name: s for s in stages}
    assert by_name["dpo"].init == by_name["dpo"].reference == "general_sft"
    # The reward model's backbone is the DPO policy; "previous" for rpo_1 is still dpo, the newest
    # policy (the reward model in between is not one).
    assert by_name["rm"].init == "dpo" and by_name["rm"].produces == "reward_model"
    for k in (1, 2, 3):
        scoring, rpo = by_name[f"rpo_{k}_annotate"], by_name[f"rpo_{k}"]
        assert scoring.reward_model == "rm" and scoring.data == (("pairs", 1.0),)
        assert scoring.config.overwrite_rewards  # the model's rewards replace the verifier's
        assert rpo.data == ((scoring.name, 1.0),) and rpo.reward_model is None
        assert rpo.init == rpo.reference == ("dpo" if k == 1 else f"rpo_{k - 1}")
    assert list(by_name["rm"].config.attribute_weights) == [0.3, 0.74, 0.46, 0.47, -0.33]  # Nemotron preset


@pytest.mark.parametrize("overrides, message", [
    (["recipe.stages.4.reward_model=dpo"], r"recipe\.stages\[4\]\.reward_model: stage 'dpo' produces a policy, "
                                           r"not a reward_model"),
    (["recipe.stages.2.init=rm"], r"recipe\.stages\[2\]\.init: 'rm' is neither a path nor a policy"),
    (["recipe.stages.3.data=[{source: rm, weight: 1.0}]"], r"recipe\.stages\[3\]\.data: unknown source 'rm'"),
    (["recipe.stages.0.reward_model=rm"], r"recipe\.stages\[0\]\.reward_model: only annotate, preference and curate"),
    (["recipe.stages.4.overrides.global_batch_size=12"],
     r"recipe\.stages\[4\] \(stage rpo_1\): stage\.global_batch_size: 12 must be a multiple of "
     r"stage\.micro_batch_size \* dp = 8 \* 2"),
    (["recipe.stages.4.overrides.beta=-1"], r"recipe\.stages\[4\] \(stage rpo_1\): stage\.beta: must be > 0"),
    (["recipe.stages.3.gguf=[f16]"], r"recipe\.stages\[3\]\.gguf: only a stage that produces a policy model"),
    (["recipe.stages.2.gguf=[q5]"], r"recipe\.stages\[2\]\.gguf: 'q5' is not one of f16, bf16, q8_0, q4_k_m"),
])
def test_bad_wiring_and_bad_stage_configs_fail_at_plan_time(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _stages(overrides)


def test_rpo_on_pairs_without_rewards_is_refused_before_the_run(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n" for _ in range(3)))
    base = [f"recipe.sources.pairs.train=[{pairs}]"]
    with pytest.raises(ConfigError, match=rf"3 of 3 pairs in {pairs} have none\. Give the stage reward_model"):
        _stages([*base, "recipe.stages.4.reward_model=null"])
    assert [s.name for s in _stages(base)][-1] == "rpo_3"  # scored by the reward model: fine


def test_a_typo_in_a_late_stage_fails_before_the_first_stage_starts(tmp_path, cache_dir):
    run = tmp_path / "run"
    # As a typo in the recipe YAML would be (on the command line Hydra itself refuses an unknown key).
    done = run_stagecraft(run, ["recipe=demo", "+recipe.stages.4.overrides.optim.lrr=1e-3"], cache_dir, nproc=2,
                          check=False)
    assert done.returncode == 2, done.stderr
    assert "recipe.stages[4].overrides" in done.stderr and "lrr" in done.stderr
    assert not (run / "stages").exists()  # nothing ran


def test_validate_plans_the_recipe():
    cfg = _compose(["recipe=demo", "recipe.stages.3.overrides.micro_batch_size=3"])
    cfg.run.dir = "/tmp/unused"
    with pytest.raises(ConfigError, match=r"recipe\.stages\[3\] \(stage rm\): stage\.global_batch_size"):
        validate(cfg, 2)


def test_a_shipped_recipe_without_its_data_names_the_missing_keys(tmp_path, cache_dir):
    """The Nemotron recipe's sources are ``train: ???`` (the user's files): through the command, a run
    that gives none is one error naming the source's key, exit 2, before any worker starts; a data
    entry without its source names that key."""
    run = tmp_path / "run"
    done = run_stagecraft(run, ["recipe=nemotron4_340b"], cache_dir, check=False, tiny=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "recipe.sources.helpsteer2.train: source helpsteer2 has no data" in done.stderr
    assert not (run / "stages").exists()
    with pytest.raises(ConfigError, match=r"recipe\.stages\[0\]\.data\[0\]\.source: required but not given"):
        validate(_compose(["recipe=demo", "recipe.stages.0.data=[{weight: 1.0}]"]), 2)
