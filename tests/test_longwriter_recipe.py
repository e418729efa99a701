"""`recipe=longwriter` at CI size through the command: the synthetic LongWriter source, the 2-step
filter as a curate stage, two SFT stages from the same untrained model, and the length-following eval
of every policy, whose numbers are recomputed here from the kept records and the S_l formula."""

from __future__ import annotations

import json

from tests.conftest import run_stagecraft
from trainer.data import length_score, produced_length, required_length

SMALL = [
    "recipe=longwriter", "cluster.nproc_per_node=1", "logging.progress=false", "logging.wandb_mode=disabled",
    "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=1",
    "recipe.sources.long.n_train=48", "recipe.sources.long.n_eval=6", "recipe.eval.length_max_new_tokens=8",
    "+recipe.stages.0.overrides.max_steps=2", "+recipe.stages.2.overrides.max_steps=2",
]


def test_the_longwriter_recipe_filters_trains_both_and_scores_lengths(tmp_path, cache_dir):
    run = tmp_path / "run"
    run_stagecraft(run, SMALL, cache_dir, tiny=False)
    summary = json.loads((run / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["sft_all", "filtered", "sft_filtered"]
    assert [s["init"] for s in summary["stages"] if s["produces"] == "policy"] == ["base", "base"]

    records = [json.loads(line) for line in (run / "data/sources/long_train.jsonl").read_text().splitlines()]

    def keeps(record):
        required = required_length(record["messages"][0]["content"])
        return required is not None and length_score(required, produced_length(record["messages"][1]["content"])) >= 80

    kept = [json.loads(line) for line in open(summary["stages"][1]["result"]["output"])]
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731  (the curate stage reads the shuffled mix)
    assert sorted(map(key, kept)) == sorted(key(r) for r in records if keeps(r)) and 0 < len(kept) < len(records)
    filtered = summary["stages"][1]["eval"]
    assert filtered["data/kept"] == len(kept) and filtered["data/kept_fraction"] == len(kept) / len(records)

    held_out = [json.loads(line) for line in (run / "data/sources/long_eval.jsonl").read_text().splitlines()]
    asking = sum(required_length(r["messages"][0]["content"]) is not None for r in held_out)
    for evals in [summary["base"]["eval"]] + [s["eval"] for s in summary["stages"] if s["produces"] == "policy"]:
        assert evals["long/length_scored"] == asking > 0
        # 8 new tokens write at most 8 words against 200-400 asked, under a third of it: S_l = 0.
        assert evals["long/length_score"] == 0.0
        assert 0.0 <= evals["long/length_ratio"] <= 8 / 200
    assert "long/length_score" in (run / "report.md").read_text()
