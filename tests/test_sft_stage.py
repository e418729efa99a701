"""The SFT stage end to end through the `stagecraft` command, on gloo CPU processes.

Every distributed layout must reproduce the 1-process trajectory (fp32, <= 1e-5): the global batch
of each step is the same set of examples however it is split, and long-ce normalises by its global
target-token count.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import (MEGATRON_CLI, STEPS, assert_same_export, assert_series_close, losses, run_stagecraft,
                         train_records)
from trainer.data.chat import collate, tokenize_chat
from trainer.data.records import read_jsonl, validate_chat_record
from trainer.losses import sft_loss

pytestmark = pytest.mark.distributed
TOL = 1e-5


@pytest.fixture(scope="module")
def zero2(tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("zero2")
    run_stagecraft(run, [*STEPS, "parallel=zero2", "stage.micro_batch_size=2"], cache_dir, nproc=2)
    return run


def _result(run) -> dict:
    return json.loads((run / "stages/sft/COMPLETE.json").read_text())


def test_reference_learns(reference):
    trajectory = losses(reference)
    assert len(trajectory) == 6 and trajectory[-1] < trajectory[0] - 0.1


@pytest.mark.parametrize("layout, overrides", [
    ("grad-accum 4 x micro-batch 2, 1 process", ["stage.micro_batch_size=2"]),
    ("2 processes x micro-batch 4", ["stage.micro_batch_size=4"]),
])
def test_batch_split_invariance(reference, tmp_path, cache_dir, layout, overrides):
    nproc = 2 if "2 processes" in layout else 1
    run_stagecraft(tmp_path, [*STEPS, *overrides], cache_dir, nproc=nproc)
    ref, got = train_records(reference), train_records(tmp_path)
    assert_series_close([r["loss"] for r in ref], [r["loss"] for r in got])
    # Same gradient, not only the same loss: the pre-clip gradient norm of every step agrees.
    assert_series_close([r["grad_norm"] for r in ref], [r["grad_norm"] for r in got], tol=1e-4)
    assert [r["target_tokens"] for r in ref] == [r["target_tokens"] for r in got]


@pytest.mark.parametrize("zero", [0, 1, 3])
def test_zero_stages_match_single_process(reference, tmp_path, cache_dir, zero):
    """2 processes x 2 micro-batches a step against 1 process x 1 micro-batch of 8. The LM head runs in
    chunks of 16 tokens, several per micro-batch (the reference's default chunk holds its whole
    micro-batch): with ZeRO-3 the chunked head once bypassed DeepSpeed's forward, and the second
    micro-batch's gradients replaced the first's instead of adding to them."""
    run_stagecraft(tmp_path, [*STEPS, f"parallel.zero_stage={zero}", "stage.micro_batch_size=2",
                              "parallel.logits_chunk_tokens=16"], cache_dir, nproc=2)
    assert_series_close(losses(reference), losses(tmp_path))


def test_zero2_matches_single_process(reference, zero2):
    assert_series_close(losses(reference), losses(zero2))


def test_autotp_matches_tp1(reference, tmp_path, cache_dir):
    run_stagecraft(tmp_path, [*STEPS, "parallel=tp2", "stage.micro_batch_size=4"], cache_dir, nproc=2)
    ref, got = train_records(reference), train_records(tmp_path)
    assert_series_close([r["loss"] for r in ref], [r["loss"] for r in got])
    assert_series_close([r["grad_norm"] for r in ref], [r["grad_norm"] for r in got], tol=1e-4)
    assert_export_reproduces_eval_loss(tmp_path)


def test_resume_after_kill_reproduces_the_uninterrupted_run(zero2, tmp_path, cache_dir):
    overrides = [*STEPS, "parallel=zero2", "stage.micro_batch_size=2"]
    killed = run_stagecraft(tmp_path, overrides, cache_dir, nproc=2, env={"STAGECRAFT_FAULT_AFTER_STEP": "4"},
                            check=False)
    assert killed.returncode != 0
    ckpt = tmp_path / "stages/sft/checkpoints"
    assert (ckpt / "latest").read_text() == "step_000003"
    assert len(losses(tmp_path)) == 4  # step 4 was logged, then the process died
    run_stagecraft(tmp_path, overrides, cache_dir, nproc=2)  # the same command again
    assert losses(tmp_path) == losses(zero2)  # bit-identical: data order, RNG, LR and optimizer restored
    assert [r["lr"] for r in train_records(tmp_path)] == [r["lr"] for r in train_records(zero2)]
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_000003", "step_000006"]  # no .partial left


def test_megatron_tensor_parallel_matches_deepspeed_and_resumes(reference, tmp_path, cache_dir):
    """parallel.strategy=megatron, TP=2, killed after step 4 and resumed by the same command from its
    dist checkpoint: the trajectory, the held-out loss and generation metrics and the hf/ export equal
    the deepspeed 1-process run (an independent implementation of the same global-batch loss)."""
    overrides = [*STEPS, "parallel=megatron_tp2pp2", "parallel.pp=1", "stage.micro_batch_size=2"]
    killed = run_stagecraft(tmp_path, overrides, cache_dir, nproc=2, script=MEGATRON_CLI,
                            env={"STAGECRAFT_FAULT_AFTER_STEP": "4"}, check=False)
    assert killed.returncode != 0
    assert (tmp_path / "stages/sft/checkpoints/latest").read_text() == "step_000003"
    assert (tmp_path / "stages/sft/checkpoints/step_000003/megatron").is_dir()  # dist_checkpointing
    run_stagecraft(tmp_path, overrides, cache_dir, nproc=2, script=MEGATRON_CLI)

    ref, got = train_records(reference), train_records(tmp_path)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, 7))
    assert_series_close([r["loss"] for r in ref], [r["loss"] for r in got])
    assert_series_close([r["grad_norm"] for r in ref], [r["grad_norm"] for r in got], tol=1e-4)
    assert [r["lr"] for r in got] == pytest.approx([r["lr"] for r in ref], rel=1e-12)
    ref, got = _result(reference), _result(tmp_path)
    evals = sorted(k for k in ref if k.startswith("eval_"))
    assert evals == sorted(k for k in got if k.startswith("eval_")) and "eval_accuracy" in evals
    for key in evals:  # held-out loss, and greedy generation through MegatronStrategy.generate
        assert got[key] == pytest.approx(ref[key], abs=TOL), key
    assert_same_export(reference / "stages/sft/hf", tmp_path / "stages/sft/hf")


def test_completed_stage_is_not_retrained(reference, cache_dir):
    before = (reference / "stages/sft/metrics.jsonl").read_text()
    proc = run_stagecraft(reference, [*STEPS, "stage.micro_batch_size=8"], cache_dir)
    assert "already complete" in proc.stderr + proc.stdout
    assert (reference / "stages/sft/metrics.jsonl").read_text() == before


def assert_export_reproduces_eval_loss(run):
    """Load hf/ with plain transformers and recompute the eval loss the trainer logged at the end."""
    hf = run / "stages/sft/hf"
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf)
    records, _ = read_jsonl(run / "data/sft_eval.jsonl", validate_chat_record)
    examples = [tokenize_chat(tokenizer, r["messages"], 65) for r in records]
    batch = collate([e for e in examples if e is not None], tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = sft_loss(logits, batch["labels"], batch["loss_mask"]).item()
    logged = _result(run)["eval_loss"]
    assert loss == pytest.approx(logged, abs=1e-5)
    return model, tokenizer


def test_hf_export_gives_the_trained_models_logits(zero2, reference):
    for run in (reference, zero2):
        model, tokenizer = assert_export_reproduces_eval_loss(run)
        assert tokenizer.chat_template and tokenizer.eos_token == "<|end|>"
    # Independent of the export path: consolidate the ZeRO-2 shards of the final checkpoint with
    # DeepSpeed's own tool and compare logits with the exported model.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(zero2 / "stages/sft/checkpoints"), tag="step_000006")
    model, tokenizer = assert_export_reproduces_eval_loss(zero2)
    rebuilt = AutoModelForCausalLM.from_pretrained(zero2 / "stages/sft/hf", dtype=torch.float32).eval()
    rebuilt.load_state_dict(state, strict=False)
    ids = tokenizer("Reverse: stage", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, rebuilt(ids).logits, atol=1e-6)
