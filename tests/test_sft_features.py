"""SFT options a user switches on by config: local HF models, bad-data policy, bf16, activation
checkpointing, CPU optimizer offload, wandb offline."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.conftest import STEPS, assert_series_close, losses, run_stagecraft, train_records
from tests.test_sft_stage import assert_export_reproduces_eval_loss
from trainer.data.synthetic import generate_chat_records, write_jsonl
from trainer.data.tokenizer import build_embedded_tokenizer

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory, cache_dir):
    """A transformers checkpoint directory of another family (Qwen2: qkv bias, tied embeddings)."""
    tokenizer = build_embedded_tokenizer(400, cache_dir / "tokenizers")
    config = AutoConfig.for_model("qwen2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  tie_word_embeddings=True)
    torch.manual_seed(0)
    src = tmp_path_factory.mktemp("qwen2-tiny")
    AutoModelForCausalLM.from_config(config).save_pretrained(src)
    tokenizer.save_pretrained(src)
    return src


def test_local_hf_checkpoint_trains_and_exports_with_its_tokenizer(tmp_path, cache_dir, qwen2_dir):
    run = tmp_path / "run"
    run_stagecraft(run, ["model=hf", f"model.path={qwen2_dir}", "stage.max_steps=3", "stage.micro_batch_size=8",
                         "logging.wandb_mode=offline"], cache_dir)
    assert len(losses(run)) == 3
    exported = json.loads((run / "stages/sft/hf/config.json").read_text())
    assert exported["model_type"] == "qwen2" and exported["tie_word_embeddings"] is True
    assert_export_reproduces_eval_loss(run)
    # wandb ran offline, inside the stage directory.
    assert list((run / "stages/sft/wandb/wandb").glob("offline-run-*"))
    # The same checkpoint loaded straight into ZeRO-3 partitions (zero.Init) on 2 processes trains
    # the same trajectory and exports the same model.
    zero3 = tmp_path / "zero3"
    run_stagecraft(zero3, ["model=hf", f"model.path={qwen2_dir}", "stage.max_steps=3", "stage.micro_batch_size=4",
                           "parallel=zero3"], cache_dir, nproc=2)
    assert_series_close(losses(run), losses(zero3), 1e-5)
    assert_export_reproduces_eval_loss(zero3)


def _bad_file(tmp_path):
    good = generate_chat_records(24, seed=5, families=["reverse", "sort"])
    path = tmp_path / "train.jsonl"
    write_jsonl(path, good)
    lines = path.read_text().splitlines()
    lines.insert(2, '{"messages": [{"role": "user", "content": "hi"}]}')  # line 3: no assistant turn
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_jsonl_line_is_an_error_naming_file_and_line(tmp_path, cache_dir):
    path = _bad_file(tmp_path)
    proc = run_stagecraft(tmp_path / "run", ["data=jsonl", f"data.train=[{path}]", "stage.max_steps=2"], cache_dir,
                          check=False)
    assert proc.returncode != 0
    assert f"{path}:3:" in proc.stderr and "assistant" in proc.stderr
    assert not (tmp_path / "run/stages/sft/checkpoints").exists()


def test_bad_jsonl_line_is_skipped_and_counted_by_policy(tmp_path, cache_dir):
    path = _bad_file(tmp_path)
    run = tmp_path / "run"
    run_stagecraft(run, ["data=jsonl", f"data.train=[{path}]", "data.on_bad_record=skip", "stage.max_steps=2",
                         "checkpoint.export_hf=false"], cache_dir)
    result = json.loads((run / "stages/sft/COMPLETE.json").read_text())
    stats = result["train_data"]
    assert {k: stats[k] for k in ("records", "skipped_bad", "dropped_length")} == {
        "records": 24, "skipped_bad": 1, "dropped_length": 0}
    # Tokenised once, by rank 0, into the shared cache (trainer/data/cache.py).
    assert stats["cache"] == "built" and stats["tokenized_ranks"] == 1


def test_activation_checkpointing_matches_reference(reference, tmp_path, cache_dir):
    run_stagecraft(tmp_path, [*STEPS, "stage.micro_batch_size=8", "parallel.activation_checkpointing=true"],
                   cache_dir)
    assert_series_close(losses(reference), losses(tmp_path), 1e-5)


def test_padded_sft_matches_packed_default(reference, tmp_path, cache_dir):
    """The default packs several conversations per row (position ids restart, attention kept within
    each); right-padded rows give the same losses."""
    run_stagecraft(tmp_path, [*STEPS, "stage.micro_batch_size=8", "stage.packing=false"], cache_dir)
    assert_series_close(losses(reference), losses(tmp_path), 1e-5)


def test_bf16_zero2_tracks_fp32(reference, tmp_path, cache_dir):
    run_stagecraft(tmp_path, [*STEPS, "parallel=zero2", "parallel.precision=bf16", "stage.micro_batch_size=4"],
                   cache_dir, nproc=2)
    got, ref = losses(tmp_path), losses(reference)
    # bf16 activations carry ~3 significant digits; the trajectory must stay within that of fp32.
    assert_series_close(ref, got, 0.02 * max(ref))
    assert got[-1] < got[0] - 0.1
    assert all(r["grad_norm"] > 0 for r in train_records(tmp_path))


def test_cpu_optimizer_offload_matches_reference(reference, tmp_path, cache_dir):
    """The one test that JIT-builds DeepSpeed's CPU Adam (about two minutes the first time)."""
    run_stagecraft(tmp_path, [*STEPS, "parallel=zero2", "parallel.offload_optimizer=true",
                              "stage.micro_batch_size=4"], cache_dir, nproc=2)
    assert_series_close(losses(reference), losses(tmp_path), 1e-5)
