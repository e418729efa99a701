"""The Nemotron chain as a user writes it: their own recipe YAML in a --config-dir, every source a JSONL
file, reward model -> annotate -> RPO on 2 processes through the `stagecraft` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import run_stagecraft, user_recipe
from trainer.data.preference import synthetic_preference_records, synthetic_reward_records
from trainer.data.synthetic import generate_chat_records, write_jsonl
from trainer.data.tokenizer import load_tokenizer
from trainer.models.reward import load_reward_model
from trainer.stages.annotate import score_pairs

pytestmark = pytest.mark.distributed

FAMILIES = ["copy", "upper"]
SMALL = {"global_batch_size": 8, "micro_batch_size": 4, "max_steps": 3, "eval_max_new_tokens": 0}


def _user_recipe(root: Path) -> list[str]:
    """conf/recipe/chain.yaml and the JSONL files it names (returns the arguments selecting it); the
    pairs carry no rewards at all."""
    data = root / "data"
    data.mkdir()
    files = {
        "chat": (generate_chat_records(32, 1, FAMILIES), generate_chat_records(8, 2, FAMILIES)),
        "ratings": (synthetic_reward_records(32, 3, FAMILIES), synthetic_reward_records(8, 4, FAMILIES)),
        "pairs": (synthetic_preference_records(32, 5, FAMILIES, with_rewards=False),
                  synthetic_preference_records(8, 6, FAMILIES, with_rewards=False)),
    }
    sources = {}
    for name, (train, eval_) in files.items():
        write_jsonl(data / f"{name}_train.jsonl", train)
        write_jsonl(data / f"{name}_eval.jsonl", eval_)
        kind = {"chat": "sft", "ratings": "reward", "pairs": "preference"}[name]
        sources[name] = {"kind": kind, "train": [str(data / f"{name}_train.jsonl")],
                         "eval": [str(data / f"{name}_eval.jsonl")]}
    recipe = {
        "run": {"name": "chain"},
        "recipe": {
            "name": "chain", "sources": sources,
            "stages": [
                {"name": "sft", "stage": "sft", "init": "base", "data": [{"source": "chat"}], "overrides": SMALL},
                {"name": "rm", "stage": "reward_nemotron4", "data": [{"source": "ratings"}], "overrides": SMALL},
                {"name": "rpo", "stage": "rpo", "reward_model": "rm", "data": [{"source": "pairs"}],
                 "overrides": SMALL},
            ],
            "eval": {"sources": ["chat", "pairs"], "max_new_tokens": 4, "batch_size": 8},
        },
    }
    return user_recipe(root, "chain", recipe)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("chain")
    run = root / "run"
    run_stagecraft(run, _user_recipe(root), cache_dir, nproc=2)
    return run


def test_rpo_trains_on_the_reward_models_own_scores(chain):
    summary = json.loads((chain / "summary.json").read_text())
    assert [(s["name"], s["type"]) for s in summary["stages"]] == [
        ("sft", "sft"), ("rm", "reward"), ("rpo_annotate", "annotate"), ("rpo", "preference")]
    annotate = summary["stages"][2]["result"]
    assert annotate["scored"] == 32 and annotate["kept"] == 0
    # Every training pair of the RPO stage carries the reward model's reward of each side, as the
    # model scores it here, in this process, independently of the annotate stage's sharding.
    data = yaml.safe_load((chain / "stages/rpo/config.yaml").read_text())["data"]
    assert len(data["train"]) == 1 and not data["mix"]  # one source: the annotate stage's file, as it is
    trained_on = [json.loads(line) for line in Path(data["train"][0]).read_text().splitlines()]
    assert len(trained_on) == 32
    model, tokenizer = load_reward_model(str(chain / "stages/rm/hf")), load_tokenizer(str(chain / "stages/rm/hf"))
    max_length = data["max_length"]
    scores = score_pairs(model.eval(), tokenizer, trained_on, max_length, torch.device("cpu"))
    got = torch.tensor([[r["chosen_reward"], r["rejected_reward"]] for r in trained_on], dtype=torch.float64)
    assert torch.allclose(got, torch.tensor(scores, dtype=torch.float64), atol=1e-5)
    # The reward is the Nemotron-weighted attribute sum the model was saved with.
    assert json.loads((chain / "stages/rm/hf/reward_config.json").read_text())["attribute_weights"] == \
        [0.3, 0.74, 0.46, 0.47, -0.33]
    # RPO's eval pairs carry no rewards and need none; the reward model was measured on them.
    assert "pairs/preference_accuracy" in summary["stages"][3]["eval"]
    assert 0.0 <= summary["stages"][1]["eval"]["pairs/rm_accuracy"] <= 1.0


def test_a_curate_stage_feeds_sft_its_kept_records(tmp_path, cache_dir):
    """LongWriter's 2-step filter as a recipe stage: SFT trains on exactly the records whose
    instruction states a length and whose response scores S_l >= 80 (recomputed here)."""
    from trainer.curation.longwriter_data import generate
    from trainer.data import length_score, produced_length, required_length

    records, _ = generate(40, seed=7, min_required=100, max_required=300)
    write_jsonl(tmp_path / "long.jsonl", records)
    recipe = {"run": {"name": "curated"}, "recipe": {
        "name": "curated", "eval": {"enabled": False},
        "sources": {"long": {"kind": "sft", "train": [str(tmp_path / "long.jsonl")]}},
        "stages": [
            {"name": "filtered", "stage": "curate", "data": [{"source": "long"}],
             "overrides": {"tool": "length-filter", "options": {"threshold": 80}}},
            {"name": "sft", "stage": "sft", "init": "base", "data": [{"source": "filtered"}], "gguf": ["f16"],
             "overrides": {**SMALL, "max_steps": 1}}]}}
    run = tmp_path / "run"
    run_stagecraft(run, [*user_recipe(tmp_path, "curated", recipe), "data.max_length=1024"], cache_dir)

    def keeps(record):
        required = required_length(record["messages"][0]["content"])
        return required is not None and length_score(required, produced_length(record["messages"][1]["content"])) >= 80

    expected = [r for r in records if keeps(r)]
    assert 0 < len(expected) < len(records)
    train = yaml.safe_load((run / "stages/sft/config.yaml").read_text())["data"]["train"]
    trained_on = [json.loads(line) for path in train for line in Path(path).read_text().splitlines()]
    key = lambda r: json.dumps(r["messages"], sort_keys=True)  # noqa: E731
    assert sorted(map(key, trained_on)) == sorted(map(key, expected))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stages"][0]["eval"]["data/kept"] == len(expected)
    # The stage's gguf step wrote its export beside hf/, every tensor of the HF model in it.
    import gguf
    from safetensors import safe_open

    (written,) = summary["stages"][1]["gguf"]
    assert written == str(run / "stages/sft/sft-f16.gguf")
    with safe_open(run / "stages/sft/hf/model.safetensors", "pt") as f:
        assert len(gguf.GGUFReader(written).tensors) == len(list(f.keys()))
