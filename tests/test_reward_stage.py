"""The reward stage and the annotate step end to end through the `stagecraft` command, on gloo CPU.

Learning is judged against two bars measured in the same run: the untrained model's held-out MSE and,
the honest one, the MSE of the best constant predictor (each attribute's training mean), which a
model that ignores its input reaches by fitting the head's bias alone.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from tests.conftest import MEGATRON_CLI, STEPS, assert_same_export, assert_series_close, run_stagecraft, train_records
from trainer.data.chat import tokenize_chat
from trainer.data.preference import collate_reward, synthetic_preference_records, tokenize_reward_example
from trainer.data.records import DataError, read_jsonl
from trainer.data.tokenizer import load_tokenizer
from trainer.losses.reward import HELPSTEER2_ATTRIBUTES
from trainer.models.reward import load_reward_model
from trainer.stages.annotate import open_part, read_part
from trainer.stages.reward import tokenized_reward_dataset

pytestmark = pytest.mark.distributed
TOL = 1e-5
DATA = {"max_length": 64}
FAMILIES = ["reverse", "sort", "count", "code_expr"]
# 64 optimizer steps over 512 records: enough for the tiny model to beat the constant predictor.
LEARN = ["stage=reward", "data.synthetic.n_train=512", "data.synthetic.n_eval=64", "stage.global_batch_size=16",
         "stage.micro_batch_size=16", "stage.epochs=2"]


def _result(run, stage):
    return json.loads((run / "stages" / stage / "COMPLETE.json").read_text())


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("reward")
    run_stagecraft(run, LEARN, cache_dir)
    return run


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """40 pairs without rewards, with 10 pairs carrying verifier rewards (1.0 / 0.0) interleaved."""
    bare = synthetic_preference_records(40, 7, FAMILIES, with_rewards=False)
    scored = synthetic_preference_records(10, 8, FAMILIES, with_rewards=True)
    records = []
    for i, record in enumerate(bare):
        records.append(record)
        if i % 4 == 0:
            records.append(scored[i // 4])
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _annotate(trained, pairs):
    return ["stage=annotate", f"stage.reward_model={trained / 'stages/reward/hf'}", f"data.train=[{pairs}]",
            "stage.micro_batch_size=4"]


@pytest.fixture(scope="module")
def annotated(tmp_path_factory, cache_dir, trained, pairs):
    """The uninterrupted annotation, sharded over 2 processes."""
    run = tmp_path_factory.mktemp("annotate")
    run_stagecraft(run, _annotate(trained, pairs), cache_dir, nproc=2)
    return run


def test_training_beats_untrained_and_constant_predictor(trained):
    result = _result(trained, "reward")
    assert result["steps"] == 64
    logged = train_records(trained, "reward")
    assert len(logged) == 64 and all({"loss", "lr", "grad_norm"} <= set(r) for r in logged)
    # Measured: 1.18 trained vs 6.35 untrained (0.19x) and 1.87 for the constant predictor (0.63x).
    assert result["eval_mse"] < 0.7 * result["eval_mse_untrained"]
    assert result["eval_mse"] < 0.8 * result["eval_mse_constant"]
    # The attributes that are functions of the text's shape (repetition, lengths) are learnt best.
    for name in ("coherence", "complexity", "verbosity"):
        assert result[f"eval_mse/{name}"] < 0.5 * result[f"eval_mse_constant/{name}"], name


def test_export_reproduces_eval_mse(trained):
    hf = trained / "stages/reward/hf"
    model = load_reward_model(hf).eval()
    assert model.attributes == list(HELPSTEER2_ATTRIBUTES) and model.attribute_weights == [1.0, 0, 0, 0, 0]
    tokenizer = load_tokenizer(str(hf))
    records, _ = read_jsonl(trained / "data/reward_eval.jsonl", lambda r: None)
    examples = [tokenize_reward_example(tokenizer, r, HELPSTEER2_ATTRIBUTES, 64) for r in records]
    batch = collate_reward([e for e in examples if e is not None], tokenizer.pad_token_id)
    with torch.no_grad():
        scores = model(batch["input_ids"], batch["attention_mask"], batch["last_index"]).double()
    mask = batch["target_mask"].double()
    mse = ((mask * (scores - batch["targets"].double()) ** 2).sum() / mask.sum()).item()
    assert mse == pytest.approx(_result(trained, "reward")["eval_mse"], abs=TOL)
    # The backbone is a plain transformers CausalLM directory with the trained weights.
    causal = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    for name, tensor in causal.state_dict().items():
        assert torch.equal(tensor, model.backbone.state_dict()[name]), name


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, cache_dir):
    """The reference layout: 1 process, deepspeed, the global batch of 8 in one micro-batch."""
    one = tmp_path_factory.mktemp("one")
    run_stagecraft(one, ["stage=reward", *STEPS, "stage.micro_batch_size=8"], cache_dir)
    return one


def test_zero2_two_processes_match_one_process(one_process, tmp_path_factory, cache_dir):
    one, two = one_process, tmp_path_factory.mktemp("two")
    run_stagecraft(two, ["stage=reward", *STEPS, "parallel=zero2", "stage.micro_batch_size=2"], cache_dir, nproc=2)
    ref, got = train_records(one, "reward"), train_records(two, "reward")
    assert len(ref) == 6 and ref[-1]["loss"] < ref[0]["loss"]
    assert_series_close([r["loss"] for r in ref], [r["loss"] for r in got])
    assert_series_close([r["grad_norm"] for r in ref], [r["grad_norm"] for r in got], tol=1e-4)
    assert [r["target_entries"] for r in ref] == [r["target_entries"] for r in got]
    assert _result(one, "reward")["eval_mse"] == pytest.approx(_result(two, "reward")["eval_mse"], abs=TOL)


def test_megatron_pipeline_parallel_matches_one_process(one_process, tmp_path, cache_dir):
    """parallel.strategy=megatron at PP=2: the attribute head sits in the last stage's output-layer slot.
    Losses, eval MSE and the export (backbone + reward_head.safetensors) equal the deepspeed run."""
    run_stagecraft(tmp_path, ["stage=reward", *STEPS, "parallel=megatron_tp2pp2", "parallel.tp=1",
                              "stage.micro_batch_size=2"], cache_dir, nproc=2, script=MEGATRON_CLI)
    ref, got = train_records(one_process, "reward"), train_records(tmp_path, "reward")
    assert_series_close([r["loss"] for r in ref], [r["loss"] for r in got])
    assert_series_close([r["grad_norm"] for r in ref], [r["grad_norm"] for r in got], tol=1e-4)
    for key in ("eval_mse", "eval_mse_untrained"):
        assert _result(tmp_path, "reward")[key] == pytest.approx(_result(one_process, "reward")[key], abs=TOL), key
    assert_same_export(one_process / "stages/reward/hf", tmp_path / "stages/reward/hf",
                       ("model.safetensors", "reward_head.safetensors"))


def test_annotate_writes_the_models_rewards_and_keeps_given_ones(annotated, trained, pairs):
    result = _result(annotated, "annotate")
    assert (result["records"], result["kept"], result["scored"], result["too_long"]) == (50, 10, 40, 0)
    inputs, outputs = _jsonl(pairs), _jsonl(annotated / "stages/annotate/annotated.jsonl")
    assert len(outputs) == len(inputs)
    for before, after in zip(inputs, outputs):  # input order, every other field as it was
        assert {k: v for k, v in after.items() if not k.endswith("_reward")} == {
            k: v for k, v in before.items() if not k.endswith("_reward")}
        if "chosen_reward" in before:  # arrived with verifier rewards: untouched
            assert (after["chosen_reward"], after["rejected_reward"]) == (before["chosen_reward"],
                                                                           before["rejected_reward"])
    # Recompute a few unbatched (no padding) with the saved model: prompt + response, last token.
    hf = trained / "stages/reward/hf"
    model, tokenizer = load_reward_model(hf).eval(), load_tokenizer(str(hf))
    fresh = [(b, a) for b, a in zip(inputs, outputs) if "chosen_reward" not in b][:6]
    for before, after in fresh:
        for side in ("chosen", "rejected"):
            ids = torch.tensor([tokenize_chat(tokenizer, before["prompt"] + before[side], 10**6)["input_ids"]])
            with torch.no_grad():
                scores = model(ids, torch.ones_like(ids), torch.tensor([ids.shape[1] - 1]))
            assert after[f"{side}_reward"] == pytest.approx(model.reward(scores).item(), abs=TOL)
            assert after[f"{side}_reward"] == pytest.approx(scores[0, 0].item(), abs=TOL)  # weights [1,0,0,0,0]


def test_annotate_resumes_after_kill_without_rescoring(annotated, trained, pairs, tmp_path, cache_dir):
    overrides = _annotate(trained, pairs)
    killed = run_stagecraft(tmp_path, overrides, cache_dir, env={"STAGECRAFT_FAULT_AFTER_STEP": "2"}, check=False)
    assert killed.returncode != 0
    stage = tmp_path / "stages/annotate"
    part = stage / "parts/rank0-of-1.jsonl"
    assert len(read_part(part)) == 8  # two batches of 4 pairs, then the kill
    assert not (stage / "COMPLETE.json").exists() and not (stage / "annotated.jsonl").exists()
    run_stagecraft(tmp_path, overrides, cache_dir)
    result = _result(tmp_path, "annotate")
    assert (result["scored_before"], result["scored_this_run"], result["scored"]) == (8, 32, 40)
    indices = [r["index"] for r in _jsonl(part)]
    assert len(indices) == len(set(indices)) == 40  # nothing scored twice
    # The same file as the uninterrupted 2-process run; rewards to float tolerance only because the
    # two layouts batch (and so pad) the pairs differently.
    got, ref = _jsonl(stage / "annotated.jsonl"), _jsonl(annotated / "stages/annotate/annotated.jsonl")
    strip = [{k: v for k, v in r.items() if not k.endswith("_reward")} for r in got]
    assert strip == [{k: v for k, v in r.items() if not k.endswith("_reward")} for r in ref]
    for key in ("chosen_reward", "rejected_reward"):
        assert_series_close([r[key] for r in got], [r[key] for r in ref])


def test_part_file_torn_last_line_is_dropped(tmp_path):
    part = tmp_path / "rank0-of-1.jsonl"
    part.write_text('{"index": 0, "chosen_reward": 1.0, "rejected_reward": 0.5}\n{"index": 2, "chosen_rew')
    assert set(read_part(part)) == {0}
    with open_part(part) as f:
        f.write('{"index": 2, "chosen_reward": 0.25, "rejected_reward": 0.0}\n')
    assert read_part(part)[2]["chosen_reward"] == 0.25 and set(read_part(part)) == {0, 2}


def test_malformed_reward_record_names_file_and_line(trained, tmp_path):
    """Through the reader the stage runs before it builds anything (a CLI start costs ~15 s here)."""
    good = {"messages": [{"role": "user", "content": "Sort: cab"}, {"role": "assistant", "content": "abc"}],
            "attributes": {"helpfulness": 4, "correctness": 4}}
    bad = {**good, "attributes": {"helpfulness": "very", "correctness": 4}}
    data = tmp_path / "reward.jsonl"
    data.write_text(f"{json.dumps(good)}\n{json.dumps(good)}\n{json.dumps(bad)}\n")
    tokenizer = load_tokenizer(str(trained / "stages/reward/hf"))
    attributes = list(HELPSTEER2_ATTRIBUTES)
    with pytest.raises(DataError, match=rf"^{re.escape(str(data))}:3: attributes.helpfulness must be a number"):
        tokenized_reward_dataset([data], tokenizer, OmegaConf.create(DATA | {"on_bad_record": "error"}), attributes)
    examples, stats = tokenized_reward_dataset([data], tokenizer, OmegaConf.create(DATA | {"on_bad_record": "skip"}),
                                               attributes)
    assert len(examples) == 2 and stats == {"records": 2, "skipped_bad": 1, "dropped_length": 0}
    assert examples[0]["target_mask"] == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_annotate_stops_on_a_signal_and_the_rerun_scores_the_rest(annotated, trained, pairs, tmp_path, cache_dir):
    """SIGTERM after the second batch: exit 75 (preempted) with the two batches on disk and no output;
    the same command then scores only the other 32 pairs."""
    overrides = _annotate(trained, pairs)
    stopped = run_stagecraft(tmp_path, overrides, cache_dir, env={"STAGECRAFT_SIGNAL_AFTER_STEP": "2"}, check=False)
    assert stopped.returncode == 75, (stopped.stdout + stopped.stderr)[-2000:]
    assert "stopped by SIGTERM" in stopped.stdout + stopped.stderr
    stage = tmp_path / "stages/annotate"
    assert len(read_part(stage / "parts/rank0-of-1.jsonl")) == 8
    assert not (stage / "COMPLETE.json").exists() and not (stage / "annotated.jsonl").exists()
    run_stagecraft(tmp_path, overrides, cache_dir)
    result = _result(tmp_path, "annotate")
    assert (result["scored_before"], result["scored_this_run"], result["scored"]) == (8, 32, 40)
