"""Resume after a change of data-parallel size, through the `stagecraft` command.

A run killed after step 4 (latest checkpoint: step 3) is resumed by the same command with another number
of processes; the global batch stays 8 and the micro-batch 2, so only the gradient accumulation adapts.
The data order is a function of the step and the loss is normalised by global counts, so the whole
6-step series must equal the 1-process reference to fp32 tolerance -- steps 4-6, computed from the
resharded weights and optimizer state, are the point. deepspeed goes through its universal checkpoint
(converted once, next to the checkpoint); megatron's dist_checkpointing reshards on load.
"""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import MEGATRON_CLI, STEPS, assert_series_close, losses, run_stagecraft, train_records

pytestmark = pytest.mark.distributed
ZERO2 = [*STEPS, "parallel=zero2", "stage.micro_batch_size=2"]
KILL = {"STAGECRAFT_FAULT_AFTER_STEP": "4"}
CKPT = "stages/sft/checkpoints"


def _kill_after_step_4(run, overrides, cache_dir, nproc, script=None) -> None:
    killed = run_stagecraft(run, overrides, cache_dir, nproc=nproc, env=KILL, check=False, script=script)
    assert killed.returncode != 0
    assert (run / CKPT / "latest").read_text() == "step_000003"
    assert len(losses(run)) == 4  # step 4 was logged, then the process died


def _resume(run, overrides, cache_dir, nproc, script=None) -> None:
    """The same command with another number of processes; it must resume (a restart from step 0 would
    reproduce the reference too), from the step-3 checkpoint."""
    proc = run_stagecraft(run, overrides, cache_dir, nproc=nproc, script=script)
    assert f"{CKPT}/step_000003 at step 3" in proc.stdout + proc.stderr


def _assert_reproduces(reference, run) -> None:
    ref, got = train_records(reference), train_records(run)
    assert [r["step"] for r in got] == list(range(1, 7))
    assert_series_close([r["loss"] for r in ref], [r["loss"] for r in got])
    assert [r["lr"] for r in got] == pytest.approx([r["lr"] for r in ref], rel=1e-12)  # LR schedule restored


@pytest.fixture(scope="module")
def killed_zero2_2proc(tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("killed_zero2_2proc")
    _kill_after_step_4(run, ZERO2, cache_dir, nproc=2)
    return run


def test_zero2_resumes_from_2_processes_in_1(reference, killed_zero2_2proc, tmp_path, cache_dir):
    run = tmp_path / "run"
    shutil.copytree(killed_zero2_2proc, run)
    _resume(run, ZERO2, cache_dir, nproc=1)
    _assert_reproduces(reference, run)
    ckpt = run / CKPT
    # Converted beside the checkpoint it came from (whose manifest covers only step_000003/ itself).
    assert (ckpt / "step_000003.universal/step_000003/zero").is_dir()
    assert not list(ckpt.glob("*.partial")) and not (ckpt / "latest_universal").exists()


def test_zero2_resumes_from_1_process_in_2(reference, tmp_path, cache_dir):
    _kill_after_step_4(tmp_path, ZERO2, cache_dir, nproc=1)
    _resume(tmp_path, ZERO2, cache_dir, nproc=2)
    _assert_reproduces(reference, tmp_path)
    assert (tmp_path / CKPT / "step_000003.universal").is_dir()


def test_megatron_resumes_from_2_processes_in_1(reference, tmp_path, cache_dir):
    """Data parallel 2 -> 1 with megatron's distributed optimizer, whose state is sharded over DP."""
    overrides = [*STEPS, "parallel=megatron_tp2pp2", "parallel.tp=1", "parallel.pp=1", "stage.micro_batch_size=2"]
    _kill_after_step_4(tmp_path, overrides, cache_dir, nproc=2, script=MEGATRON_CLI)
    _resume(tmp_path, overrides, cache_dir, nproc=1, script=MEGATRON_CLI)
    _assert_reproduces(reference, tmp_path)
