"""``parallel.strategy=megatron`` through the ``stagecraft`` command: the same stages, data and losses as
the deepspeed strategy, one config key apart.

Each run is the real command (Hydra config, validation, stage loop, checkpoints, evaluation, export)
started by tests/megatron_cli.py, which applies the test-only CPU compat layer for megatron-core first.
The reference for every trajectory is the deepspeed strategy's 1-process run of the same config: an
independent implementation (HF model, DeepSpeed engine) of the same global-batch loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import STEPS, losses, run_stagecraft, train_records

CLI = Path(__file__).with_name("megatron_cli.py")
TOL = 1e-5
MEGATRON = ["parallel=megatron_tp2pp2"]


def _result(run: Path, stage: str) -> dict:
    return json.loads((run / "stages" / stage / "COMPLETE.json").read_text())


def _assert_same_trajectory(ref: list[dict], got: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for r, g in zip(ref, got):
        assert abs(r["loss"] - g["loss"]) <= TOL and abs(r["grad_norm"] - g["grad_norm"]) <= 1e-4, (r, g)
        assert g["lr"] == pytest.approx(r["lr"], rel=1e-12)


def _assert_same_export(ref: Path, got: Path, files: tuple[str, ...] = ("model.safetensors",)) -> None:
    """The two hf/ exports hold the same tensors; Adam amplifies float noise on tiny gradients, so the
    bound is looser than the loss bound."""
    for name in files:
        a, b = load_file(str(ref / name)), load_file(str(got / name))
        assert sorted(a) == sorted(b), name
        worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        assert worst <= 1e-4, (name, worst)


@pytest.mark.distributed
def test_sft_on_tensor_parallel_matches_deepspeed_and_resumes(reference, tmp_path, cache_dir):
    """TP=2, killed after step 4, resumed by the same command: the whole trajectory, the held-out loss
    and generation metrics and the hf/ export equal the deepspeed 1-process run."""
    overrides = [*STEPS, *MEGATRON, "parallel.pp=1", "stage.micro_batch_size=2"]
    killed = run_stagecraft(tmp_path, overrides, cache_dir, nproc=2, script=CLI,
                            env={"STAGECRAFT_FAULT_AFTER_STEP": "4"}, check=False)
    assert killed.returncode != 0
    assert (tmp_path / "stages/sft/checkpoints/latest").read_text() == "step_000003"
    assert (tmp_path / "stages/sft/checkpoints/step_000003/megatron").is_dir()  # dist_checkpointing
    run_stagecraft(tmp_path, overrides, cache_dir, nproc=2, script=CLI)

    _assert_same_trajectory(train_records(reference), train_records(tmp_path))
    ref, got = _result(reference, "sft"), _result(tmp_path, "sft")
    evals = sorted(k for k in ref if k.startswith("eval_"))
    assert evals == sorted(k for k in got if k.startswith("eval_")) and "eval_accuracy" in evals
    for key in evals:  # held-out loss, and greedy generation through MegatronStrategy.generate
        assert got[key] == pytest.approx(ref[key], abs=TOL), key
    _assert_same_export(reference / "stages/sft/hf", tmp_path / "stages/sft/hf")


@pytest.mark.distributed
def test_reward_model_on_pipeline_parallel_matches_deepspeed(tmp_path, cache_dir):
    """PP=2: the attribute head sits in the last stage's output-layer slot; losses, eval MSE and the
    export (backbone + reward_head.safetensors) equal the deepspeed 1-process run."""
    one, two = tmp_path / "deepspeed", tmp_path / "megatron"
    run_stagecraft(one, ["stage=reward", *STEPS, "stage.micro_batch_size=8"], cache_dir)
    run_stagecraft(two, ["stage=reward", *STEPS, *MEGATRON, "parallel.tp=1", "stage.micro_batch_size=2"],
                   cache_dir, nproc=2, script=CLI)
    _assert_same_trajectory(train_records(one, "reward"), train_records(two, "reward"))
    for key in ("eval_mse", "eval_mse_untrained"):
        assert _result(two, "reward")[key] == pytest.approx(_result(one, "reward")[key], abs=TOL), key
    _assert_same_export(one / "stages/reward/hf", two / "stages/reward/hf",
                        ("model.safetensors", "reward_head.safetensors"))
    assert losses(two, "reward")[-1] < losses(two, "reward")[0]
