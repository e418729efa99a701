"""Preference stages (DPO / IPO / RPO) end to end through `stagecraft`, on gloo CPU processes."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import MEGATRON_CLI, assert_series_close, run_stagecraft, train_records
from trainer.data.preference import synthetic_preference_records
from trainer.data.synthetic import write_jsonl

pytestmark = pytest.mark.distributed
FAMILIES = ["reverse", "sort"]
SIX = ["stage.max_steps=6", "stage.global_batch_size=8", "checkpoint.export_hf=false"]


def _result(run, stage="dpo"):
    return json.loads((run / "stages" / stage / "COMPLETE.json").read_text())


def _series(run, key, stage="dpo"):
    return [r[key] for r in train_records(run, stage)]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Shared preference data (chosen verified correct, rejected wrong, verifier rewards 1 / 0)."""
    root = tmp_path_factory.mktemp("pairs")
    write_jsonl(root / "train.jsonl", synthetic_preference_records(96, seed=3, families=FAMILIES))
    write_jsonl(root / "eval.jsonl", synthetic_preference_records(32, seed=4, families=FAMILIES))
    return root


def _data(pairs_file):
    return ["data=jsonl", f"data.train=[{pairs_file / 'train.jsonl'}]", f"data.eval=[{pairs_file / 'eval.jsonl'}]",
            "data.max_length=64"]


@pytest.fixture(scope="module")
def dpo_reference(tmp_path_factory, cache_dir, pairs_file):
    """1 process, cached reference log-probs computed on first use."""
    run = tmp_path_factory.mktemp("dpo-ref")
    run_stagecraft(run, ["stage=dpo", *_data(pairs_file), *SIX, "stage.micro_batch_size=8"], cache_dir)
    return run


def test_first_run_computes_the_reference_once(dpo_reference):
    assert _result(dpo_reference)["reference_forward_pairs"] == 96 + 32  # train + eval, each pair once
    assert _series(dpo_reference, "pref_loss")[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference


def test_zero2_two_processes_reuse_the_cache_and_match(dpo_reference, tmp_path, cache_dir, pairs_file):
    run_stagecraft(tmp_path, ["stage=dpo", *_data(pairs_file), *SIX, "parallel=zero2", "stage.micro_batch_size=2"],
                   cache_dir, nproc=2)
    assert _result(tmp_path)["reference_forward_pairs"] == 0  # the counter: no reference forward at all
    assert_series_close(_series(dpo_reference, "loss"), _series(tmp_path, "loss"))
    assert_series_close(_series(dpo_reference, "margin"), _series(tmp_path, "margin"))


@pytest.mark.distributed
def test_megatron_pipeline_matches_deepspeed(dpo_reference, tmp_path, cache_dir, pairs_file):
    """parallel.strategy=megatron at PP=2 (tests/megatron_cli.py applies the CPU compat layer): the same
    loss, implicit-reward metrics (recorded by the loss on the last pipeline stage only, logged by rank 0
    on the first) and held-out ranking as the deepspeed 1-process run."""
    run_stagecraft(tmp_path, ["stage=dpo", *_data(pairs_file), *SIX, "parallel=megatron_tp2pp2", "parallel.tp=1",
                              "stage.micro_batch_size=2"], cache_dir, nproc=2, script=MEGATRON_CLI)
    for key in ("loss", "pref_loss", "margin", "reward_accuracy", "logps_chosen", "grad_norm"):
        # At step 1 policy == reference: each margin is 0 up to float noise, and the cached reference came
        # from deepspeed's prompt-shared layout, megatron's from padded rows, so that accuracy is a coin flip.
        skip = 1 if key == "reward_accuracy" else 0
        assert_series_close(_series(dpo_reference, key)[skip:], _series(tmp_path, key)[skip:],
                            tol=1e-4 if key == "grad_norm" else 1e-5)
    ref, got = _result(dpo_reference), _result(tmp_path)
    # Before training every implicit margin is 0 up to float noise, so the before-accuracy is a coin
    # flip per pair (the cached reference came from the deepspeed run); every other number must agree.
    keys = [k for k in ref if k.startswith(("before_", "eval_")) and k != "before_eval_reward_accuracy"]
    assert "eval_reward_accuracy" in keys
    for key in keys:
        assert got[key] == pytest.approx(ref[key], abs=1e-5), key


def test_killed_and_resumed_reports_the_starting_model_as_before(dpo_reference, tmp_path, cache_dir, pairs_file):
    """A crash after the step-3 checkpoint, then the same command: the resumed stage continues the
    trajectory, and its before_* numbers describe the model the stage started from (measured before the
    checkpoint loads), not the checkpoint it resumed from."""
    args = ["stage=dpo", *_data(pairs_file), *SIX, "stage.micro_batch_size=8", "checkpoint.every_steps=3"]
    killed = run_stagecraft(tmp_path, args, cache_dir, env={"STAGECRAFT_FAULT_AFTER_STEP": "4"}, check=False)
    assert killed.returncode != 0 and not (tmp_path / "stages/dpo/COMPLETE.json").exists()
    run_stagecraft(tmp_path, args, cache_dir)
    assert_series_close(_series(dpo_reference, "loss"), _series(tmp_path, "loss"))
    ref, got = _result(dpo_reference), _result(tmp_path)
    before = [k for k in ref if k.startswith("before_")]
    assert before and all(got[k] == pytest.approx(ref[k], abs=1e-9) for k in before)
    assert got["before_eval_preference_accuracy"] != got["eval_preference_accuracy"]  # training changed it


def test_online_reference_equals_cached(dpo_reference, tmp_path, cache_dir, pairs_file):
    run_stagecraft(tmp_path, ["stage=dpo", *_data(pairs_file), *SIX, "stage.micro_batch_size=4",
                              "stage.reference_mode=online"], cache_dir)
    assert _result(tmp_path)["reference_forward_pairs"] == 6 * 8 + 32
    assert_series_close(_series(dpo_reference, "loss"), _series(tmp_path, "loss"))


@pytest.mark.parametrize("layout", [
    ["stage.packing=false", "stage.prefix_sharing=false"],  # right-padded rows c_0..c_n, r_0..r_n
    ["stage.packing=true", "stage.prefix_sharing=false"],  # packed, every prompt twice
    ["stage.packing=false", "stage.prefix_sharing=true"],  # one prompt-shared pair a row
])
def test_every_pair_layout_gives_the_default_losses(dpo_reference, tmp_path, cache_dir, pairs_file, layout):
    """The default (prompt shared, packed; deepspeed) against each other layout, the padded one included."""
    run_stagecraft(tmp_path, ["stage=dpo", *_data(pairs_file), *SIX, "stage.micro_batch_size=8", *layout],
                   cache_dir)
    assert_series_close(_series(dpo_reference, "loss"), _series(tmp_path, "loss"))
    assert_series_close(_series(dpo_reference, "logps_chosen"), _series(tmp_path, "logps_chosen"), tol=1e-4)


def test_dpo_raises_held_out_reward_accuracy(tmp_path, cache_dir):
    """40 steps from a random init on 128 held-out pairs (measured: 0.79; 0.7 is > 4 binomial sigmas
    above chance)."""
    run_stagecraft(tmp_path, ["stage=dpo", "data.synthetic.n_train=1280", "data.synthetic.n_eval=128",
                              "data.synthetic.families=[sort,upper]", "stage.max_steps=40",
                              "stage.global_batch_size=16", "stage.optim.lr=3e-3", "checkpoint.export_hf=false"],
                   cache_dir)
    result = _result(tmp_path)
    assert result["before_eval_reward_accuracy"] == 0.0  # policy == reference: every margin is 0
    assert result["eval_reward_accuracy"] >= 0.7, result
    assert result["eval_margin"] > 0.05


@pytest.mark.parametrize("overrides, expected", [
    # IPO at zero margin: (0 - 1/(2*beta))^2 with beta = 0.1.
    (["stage=ipo", "stage.beta=0.1"], lambda first: 25.0),
    # RPO bwd_kl at a = 0 (policy == reference), b = eta * (1 - 0): KL(Bern(sigma(b)) || Bern(1/2)).
    (["stage=rpo", "stage.eta=1.0"], lambda first: (lambda p: p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p)))(
        1 / (1 + math.exp(-1.0)))),
    # Only the SFT term: the loss is the chosen responses' NLL (summed over tokens) averaged over pairs.
    (["stage=dpo", "stage.preference_weight=0", "stage.sft_weight=1"], lambda first: -first["logps_chosen"]),
])
def test_first_step_closed_forms(tmp_path, cache_dir, pairs_file, overrides, expected):
    run_stagecraft(tmp_path, [*overrides, *_data(pairs_file), "stage.max_steps=1", "stage.global_batch_size=8",
                              "stage.micro_batch_size=8", "checkpoint.export_hf=false"], cache_dir)
    stage = overrides[0].split("=")[1]
    first = train_records(tmp_path, stage)[0]
    assert first["loss"] == pytest.approx(expected(first), rel=1e-5)
    if stage == "rpo":
        assert first["target_gap"] == pytest.approx(1.0)


def test_malformed_pair_names_file_and_line(tmp_path, cache_dir, pairs_file):
    lines = (pairs_file / "train.jsonl").read_text().splitlines()
    bad = json.loads(lines[4])
    del bad["rejected"]
    lines[4] = json.dumps(bad)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    proc = run_stagecraft(tmp_path / "run", ["stage=dpo", "data=jsonl", f"data.train=[{path}]", "stage.max_steps=1"],
                          cache_dir, check=False)
    assert proc.returncode != 0 and f"{path}:5:" in proc.stderr and "rejected" in proc.stderr
